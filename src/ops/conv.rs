//! Convolutions (NCHW): conv2d, conv1d and conv_transpose2d, forward and backward, as
//! implicit GEMMs in `shaders/conv.wgsl`.

use bytemuck::{Pod, Zeroable};

use super::matmul::{matmul_folded, Fold};
use super::tune::ConvPass;
use super::Epilogue;
use crate::autograd::{record, Op};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, Variant};
use crate::tensor::Tensor;

/// Uniform parameters of `shaders/conv.wgsl` (its `Params` struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ConvParams {
    pub n: u32,
    pub c_in: u32,
    pub h: u32,
    pub w: u32,
    pub c_out: u32,
    pub oh: u32,
    pub ow: u32,
    pub groups: u32,
    pub kh: u32,
    pub kw: u32,
    pub sh: u32,
    pub sw: u32,
    pub ph: u32,
    pub pw: u32,
    pub dh: u32,
    pub dw: u32,
    pub row_base: u32,
    pub epilogue: u32,
    pub act_alpha: f32,
    pub off_bias: u32,
    pub splits: u32,
    pub chunk: u32,
    pub _pad: [u32; 2],
}

/// The geometry of one convolution in conv2d terms: input (n, c_in, h, w), weight
/// (c_out, c_in / groups, kh, kw), output (n, c_out, oh, ow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub oh: usize,
    pub ow: usize,
    pub groups: usize,
    pub k: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

/// Options of [`Tensor::conv2d`] (PyTorch's defaults by `Default`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dOptions {
    /// Step between windows, (height, width).
    pub stride: [usize; 2],
    /// Zeros added on each side, (height, width).
    pub padding: [usize; 2],
    /// Spacing between kernel taps, (height, width).
    pub dilation: [usize; 2],
    /// Channel groups: 1 is a full convolution, `C` a depthwise one.
    pub groups: usize,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Conv2dOptions {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

/// Options of [`Tensor::conv_transpose2d`] (PyTorch's defaults by `Default`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose2dOptions {
    /// Stride of the convolution this one transposes.
    pub stride: [usize; 2],
    /// Padding of the convolution this one transposes (removed from the output).
    pub padding: [usize; 2],
    /// Extra rows/columns added to one side of the output; each below the stride or dilation.
    pub output_padding: [usize; 2],
    /// Spacing between kernel taps.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub groups: usize,
}

impl Default for ConvTranspose2dOptions {
    fn default() -> Self {
        ConvTranspose2dOptions {
            stride: [1, 1],
            padding: [0, 0],
            output_padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

const MAX_GROUPS: usize = 65535;

impl ConvGeometry {
    fn params(&self, row_base: usize, epi: &Epilogue<'_>) -> ConvParams {
        ConvParams {
            n: self.n as u32,
            c_in: self.c_in as u32,
            h: self.h as u32,
            w: self.w as u32,
            c_out: self.c_out as u32,
            oh: self.oh as u32,
            ow: self.ow as u32,
            groups: self.groups as u32,
            kh: self.k[0] as u32,
            kw: self.k[1] as u32,
            sh: self.stride[0] as u32,
            sw: self.stride[1] as u32,
            ph: self.padding[0] as u32,
            pw: self.padding[1] as u32,
            dh: self.dilation[0] as u32,
            dw: self.dilation[1] as u32,
            row_base: row_base as u32,
            epilogue: epi.flags(),
            act_alpha: epi.alpha(),
            off_bias: epi.off_bias(),
            splits: 1,
            chunk: u32::MAX,
            _pad: [0; 2],
        }
    }

    /// Records `kernel` (forward or input gradient) over a GEMM of `rows` x `cols` per group,
    /// in chunks of rows that fit the dispatch limit.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        kernel: Kernel,
        a: &Tensor,
        b: &Tensor,
        out: &Tensor,
        rows: usize,
        cols: usize,
        epi: &Epilogue<'_>,
    ) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        // Rows x columns per workgroup; the register kernels take rows along x (neighbouring
        // invocations on neighbouring rows), the tiled ones along y.
        let ([tile_rows, tile_cols], rows_on_x) = match kernel {
            Kernel::Conv2dSgFwd | Kernel::Conv2dSgBwdInput => ([512, 8], true),
            Kernel::Conv2dFwd | Kernel::Conv2dBwdInput => ([64, 64], true),
            _ => ([64, 64], false),
        };
        let chunk = MAX_GROUPS * tile_rows;
        let mut base = 0;
        while base < rows {
            let these = (rows - base).min(chunk);
            let (gr, gc) = (
                these.div_ceil(tile_rows) as u32,
                cols.div_ceil(tile_cols) as u32,
            );
            let [gx, gy] = if rows_on_x { [gr, gc] } else { [gc, gr] };
            let p = self.params(base, epi);
            let mut inputs = vec![a.buffer(), b.buffer()];
            if matches!(
                kernel,
                Kernel::Conv2dFwd | Kernel::Conv2dSgFwd | Kernel::Conv2dTiledFwd
            ) {
                // Without a bias, any buffer fills the binding the kernel does not read.
                inputs.push(epi.bias.map_or(b.buffer(), |t| t.buffer()));
            }
            out.device().dispatch_variant(
                kernel,
                epi.variant,
                &inputs,
                &[out.buffer()],
                bytemuck::bytes_of(&p),
                [gx, gy, self.groups as u32],
            )?;
            base += these;
        }
        Ok(())
    }
}

/// Whether conv2d runs as an explicit im2col matrix times the weight (the tuner's
/// [`super::tune::conv_lowering`]); `padded_ok` false for the input gradient, which needs an
/// unpadded depth.
fn gemm_suits(device: &crate::device::Device, g: &ConvGeometry, padded_ok: bool) -> bool {
    super::tune::conv_lowering(device, g, gemm_depth(g), padded_ok)
}

/// The im2col matrix's rows: the reduction depth `c_in kh kw`, padded to a multiple of 4.
fn gemm_depth(g: &ConvGeometry) -> usize {
    (g.c_in * g.k[0] * g.k[1]).next_multiple_of(4)
}

/// The im2col matrix of `x` (dense): (`gemm_depth`, n, oh ow), its padding rows zero. Not
/// recorded.
fn im2col(x: &Tensor, g: &ConvGeometry) -> Result<Tensor> {
    let (rows, plane) = (gemm_depth(g), g.oh * g.ow);
    let cols = Tensor::uninit("conv2d", &[rows, g.n, plane], x.device())?;
    let total = rows * g.n * plane;
    let mut p = g.params(0, &Epilogue::default());
    p._pad = [(total < 1 << 22) as u32, rows as u32];
    x.device().dispatch(
        Kernel::Conv2dIm2colFwd,
        &[x.buffer()],
        cols.buffer(),
        bytemuck::bytes_of(&p),
        super::grid(total / 4, 256),
    );
    Ok(cols)
}

/// The weight as a (c_out, `gemm_depth`) matrix, its padding columns zero: padded once for
/// as long as the weight does not change (a frozen model's), at each change otherwise (an
/// optimizer step). Not recorded.
fn gemm_weight(w: &Tensor, g: &ConvGeometry) -> Result<Tensor> {
    let (depth, rows) = (g.c_in * g.k[0] * g.k[1], gemm_depth(g));
    if rows != depth {
        if let Some(padded) = w.derived().filter(|t| t.dims() == [g.c_out, rows]) {
            return Ok(padded);
        }
    }
    let version = w.version();
    let flat = w.detach().dense()?.reshape_to(&[g.c_out, depth])?;
    if rows == depth {
        return Ok(flat);
    }
    let padded = Tensor::zeros(&[g.c_out, rows], w.device())?;
    let into = crate::shape::Layout {
        shape: vec![g.c_out, depth],
        strides: vec![rows, 1],
        offset: 0,
    };
    super::elementwise::copy_into(&flat, &padded, &into)?;
    w.set_derived(version, &padded);
    Ok(padded)
}

/// `out = epi(conv2d(x, w))` as `w (c_out, depth) @ cols`, one product over every sample's
/// positions written out as NCHW ([`Fold::OutCols`]), the bias along the product's rows (the
/// channels). Returns `cols`.
fn gemm_fwd_into(
    x: &Tensor,
    w: &Tensor,
    g: &ConvGeometry,
    out: &Tensor,
    epi: &Epilogue<'_>,
) -> Result<Tensor> {
    let (rows, plane) = (gemm_depth(g), g.oh * g.ow);
    let cols = im2col(&x.detach().dense()?, g)?;
    let weight = gemm_weight(w, g)?;
    let epi = Epilogue {
        bias_rows: true,
        ..*epi
    };
    let b = cols.reshape_to(&[rows, g.n * plane])?;
    if !matmul_folded(&weight, &b, out, &epi, Fold::OutCols(plane))? {
        // Per sample: w @ cols[:, nn, :].
        let a = weight.reshape_to(&[1, g.c_out, rows])?;
        let y = out.reshape_to(&[g.n, g.c_out, plane])?;
        super::matmul::matmul_into(&a, &cols.permute(&[1, 0, 2])?, &y, &epi)?;
    }
    Ok(cols)
}

/// dx of conv2d: the gradient of the im2col matrix, `w^T (depth, c_out) @ dy` over every
/// sample's positions ([`Fold::BCols`]; per sample where that does not fit the vec4 kernels,
/// as when c_out is not a multiple of 4), summed back onto the input positions.
fn gemm_bwd_input(dy: &Tensor, w: &Tensor, g: &ConvGeometry) -> Result<Tensor> {
    let (depth, plane) = (g.c_in * g.k[0] * g.k[1], g.oh * g.ow);
    let wt = w
        .detach()
        .dense()?
        .reshape_to(&[g.c_out, depth])?
        .transpose(0, 1)?;
    let dy = dy.detach().dense()?.reshape_to(&[g.n, g.c_out, plane])?;
    // dcols as (depth, n, plane), else (n, depth, plane): (row stride, sample stride).
    let mut dcols = Tensor::uninit("conv2d_backward", &[depth, g.n, plane], dy.device())?;
    let mut strides = [g.n * plane, plane];
    let none = Epilogue::default();
    if !matmul_folded(&wt, &dy, &dcols, &none, Fold::BCols(plane))? {
        dcols = dcols.reshape_to(&[g.n, depth, plane])?;
        strides = [plane, depth * plane];
        super::matmul::matmul_into(&wt.unsqueeze(0)?, &dy, &dcols, &none)?;
    }
    let dx = Tensor::uninit("conv2d_backward", &[g.n, g.c_in, g.h, g.w], dy.device())?;
    let total = dx.numel();
    let mut p = g.params(0, &none);
    // col2im splits positions of dx only.
    p._pad[0] = (total < 1 << 22) as u32;
    (p.splits, p.chunk) = (strides[0] as u32, strides[1] as u32);
    dy.device().dispatch(
        Kernel::Conv2dCol2imBwd,
        &[dcols.buffer()],
        dx.buffer(),
        bytemuck::bytes_of(&p),
        super::grid(total, 256),
    );
    Ok(dx)
}

/// dw of conv2d from the im2col matrix `cols` (`gemm_depth`, n, oh ow): the sum over samples
/// of `dy[nn] (c_out, oh ow) @ cols[:, nn, :]^T` in one product ([`Fold::Sum`]). Where that
/// does not fit the vec4 kernels: with no more output channels than plane positions, the
/// per-sample products summed (they take no more memory than `cols`); otherwise one matmul
/// over all positions, `dy` copied to (c_out, n oh ow).
fn gemm_bwd_weight(dy: &Tensor, cols: &Tensor, g: &ConvGeometry) -> Result<Tensor> {
    let (depth, rows, plane) = (g.c_in * g.k[0] * g.k[1], gemm_depth(g), g.oh * g.ow);
    let dy = dy.detach().dense()?.reshape_to(&[g.n, g.c_out, plane])?;
    let b = cols.permute(&[1, 2, 0])?;
    let mut dw = Tensor::uninit("conv2d_backward", &[g.c_out, rows], dy.device())?;
    let none = Epilogue::default();
    let folded = matmul_folded(&dy, &b, &dw, &none, Fold::Sum)?;
    if !folded && g.c_out <= plane {
        let per_sample = Tensor::uninit("conv2d_backward", &[g.n, g.c_out, rows], dy.device())?;
        super::matmul::matmul_into(&dy, &b, &per_sample, &none)?;
        dw = per_sample.sum(&[0], false)?;
    } else if !folded {
        let positions = g.n * plane;
        let a = dy
            .permute(&[1, 0, 2])?
            .contiguous()?
            .reshape_to(&[1, g.c_out, positions])?;
        let b = cols.reshape_to(&[1, rows, positions])?.transpose(1, 2)?;
        super::matmul::matmul_into(&a, &b, &dw.reshape_to(&[1, g.c_out, rows])?, &none)?;
    }
    let dw = if rows == depth {
        dw
    } else {
        dw.narrow(1, 0, depth)?.contiguous()?
    };
    dw.reshape_to(&[g.c_out, g.c_in, g.k[0], g.k[1]])
}

/// y = conv2d(x, w) (+ `bias`, contiguous, along the channels). Not recorded.
pub(crate) fn conv_fwd(
    x: &Tensor,
    w: &Tensor,
    g: &ConvGeometry,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    Ok(conv_fwd_saving(x, w, g, bias, false)?.0)
}

/// [`conv_fwd`] (then relu where `relu`, in the kernel's store), and the im2col matrix where
/// the product ran through one: what the weight gradient reads (see [`conv_bwd_weight`]), so
/// that it is built once a step.
pub(crate) fn conv_fwd_saving(
    x: &Tensor,
    w: &Tensor,
    g: &ConvGeometry,
    bias: Option<&Tensor>,
    relu: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let out = Tensor::uninit("conv2d", &[g.n, g.c_out, g.oh, g.ow], x.device())?;
    let epi = Epilogue {
        bias,
        activation: relu.then_some((super::elementwise::UnaryOp::Relu, 0.0)),
        ..Default::default()
    };
    let cols = conv_fwd_into_saving(x, w, g, &out, &epi)?;
    Ok((out, cols))
}

/// Records `out = epilogue(conv2d(x, w))` into `out` (contiguous from offset 0). Not recorded
/// for autograd.
pub(crate) fn conv_fwd_into(
    x: &Tensor,
    w: &Tensor,
    g: &ConvGeometry,
    out: &Tensor,
    epi: &Epilogue<'_>,
) -> Result<()> {
    conv_fwd_into_saving(x, w, g, out, epi).map(drop)
}

/// [`conv_fwd_into`], returning the im2col matrix where the product ran through one.
fn conv_fwd_into_saving(
    x: &Tensor,
    w: &Tensor,
    g: &ConvGeometry,
    out: &Tensor,
    epi: &Epilogue<'_>,
) -> Result<Option<Tensor>> {
    if epi.variant == Variant::F32 && gemm_suits(x.device(), g, true) {
        return gemm_fwd_into(x, w, g, out, epi).map(Some);
    }
    let (rows, cols) = (g.n * g.oh * g.ow, g.c_out / g.groups);
    let kernel = super::tune::conv(
        x.device(),
        [rows, cols, g.c_in / g.groups * g.k[0] * g.k[1], g.groups],
        ConvPass::Forward,
        rows >= 256 && cols >= 16,
        &|k| conv_fwd_into_with(x, w, g, out, epi, k).map(|()| out.clone()),
    )?;
    conv_fwd_into_with(x, w, g, out, epi, kernel).map(|()| None)
}

fn conv_fwd_into_with(
    x: &Tensor,
    w: &Tensor,
    g: &ConvGeometry,
    out: &Tensor,
    epi: &Epilogue<'_>,
    kernel: Kernel,
) -> Result<()> {
    let kernel = ConvPass::Forward.forced(kernel)?;
    let (x, w) = (x.dense()?, w.dense()?);
    g.launch(
        kernel,
        &x,
        &w,
        out,
        g.n * g.oh * g.ow,
        g.c_out / g.groups,
        epi,
    )
}

impl Tensor {
    /// conv2d (no bias) with the kernel asked for (`Conv2dFwd`, `Conv2dSgFwd` or
    /// `Conv2dTiledFwd`; for tests and benchmarks that compare them). Not recorded for
    /// autograd.
    #[doc(hidden)]
    pub fn conv2d_forward_with(
        &self,
        weight: &Tensor,
        opts: &Conv2dOptions,
        kernel: Kernel,
    ) -> Result<Tensor> {
        let g = conv2d_geometry(self.dims(), weight.dims(), opts)?;
        let out = Tensor::uninit("conv2d", &[g.n, g.c_out, g.oh, g.ow], self.device())?;
        conv_fwd_into_with(self, weight, &g, &out, &Epilogue::default(), kernel)?;
        Ok(out)
    }
}

/// dx of conv2d given dy and w (also the forward of conv_transpose2d). Not recorded.
pub(crate) fn conv_bwd_input(dy: &Tensor, w: &Tensor, g: &ConvGeometry) -> Result<Tensor> {
    if gemm_suits(dy.device(), g, false) {
        return gemm_bwd_input(dy, w, g);
    }
    let (rows, cols) = (g.n * g.h * g.w, g.c_in / g.groups);
    let kernel = super::tune::conv(
        dy.device(),
        [rows, cols, g.c_out / g.groups * g.k[0] * g.k[1], g.groups],
        ConvPass::InputGrad,
        rows >= 256 && cols >= 16,
        &|k| conv_bwd_input_with(dy, w, g, k),
    )?;
    conv_bwd_input_with(dy, w, g, kernel)
}

fn conv_bwd_input_with(
    dy: &Tensor,
    w: &Tensor,
    g: &ConvGeometry,
    kernel: Kernel,
) -> Result<Tensor> {
    let kernel = ConvPass::InputGrad.forced(kernel)?;
    let (dy, w) = (dy.dense()?, w.dense()?);
    let out = Tensor::uninit("conv2d_backward", &[g.n, g.c_in, g.h, g.w], dy.device())?;
    if g.c_out == 0 {
        return Tensor::zeros(out.dims(), dy.device());
    }
    let (rows, cols) = (g.n * g.h * g.w, g.c_in / g.groups);
    g.launch(kernel, &dy, &w, &out, rows, cols, &Epilogue::default())?;
    Ok(out)
}

impl Tensor {
    /// The input gradient of conv2d for output gradient `self` and `weight`, with the kernel
    /// asked for (`Conv2dBwdInput`, `Conv2dSgBwdInput` or `Conv2dBwdInputTiled`; for tests
    /// and benchmarks that compare them).
    #[doc(hidden)]
    pub fn conv2d_input_grad_with(
        &self,
        weight: &Tensor,
        input_shape: &[usize],
        opts: &Conv2dOptions,
        kernel: Kernel,
    ) -> Result<Tensor> {
        let g = conv2d_geometry(input_shape, weight.dims(), opts)?;
        conv_bwd_input_with(self, weight, &g, kernel)
    }
}

/// dw of conv2d given dy and x, or the im2col matrix of x that [`conv_fwd_saving`] returned
/// (`x_is_cols`). Not recorded.
pub(crate) fn conv_bwd_weight(
    dy: &Tensor,
    x: &Tensor,
    g: &ConvGeometry,
    x_is_cols: bool,
) -> Result<Tensor> {
    if x_is_cols {
        return gemm_bwd_weight(dy, x, g);
    }
    if gemm_suits(dy.device(), g, true) {
        return gemm_bwd_weight(dy, &im2col(&x.detach().dense()?, g)?, g);
    }
    // The reduction runs over positions: by default the tiled kernel for long ones.
    let positions = g.n * g.oh * g.ow;
    let kernel = super::tune::conv(
        dy.device(),
        [
            g.c_out / g.groups,
            g.c_in / g.groups * g.k[0] * g.k[1],
            positions,
            g.groups,
        ],
        ConvPass::WeightGrad,
        positions >= 1024,
        &|k| conv_bwd_weight_with(dy, x, g, k, None),
    )?;
    conv_bwd_weight_with(dy, x, g, kernel, None)
}

impl Tensor {
    /// The weight gradient of conv2d for output gradient `self` and input `x`, with the
    /// kernel (`Conv2dBwdWeight`, `Conv2dSgBwdWeight` or `Conv2dBwdWeightTiled`) and the
    /// number of position splits as asked (for tests and benchmarks that compare them).
    #[doc(hidden)]
    pub fn conv2d_weight_grad_with(
        &self,
        x: &Tensor,
        weight_shape: &[usize],
        opts: &Conv2dOptions,
        kernel: Kernel,
        splits: Option<usize>,
    ) -> Result<Tensor> {
        let g = conv2d_geometry(x.dims(), weight_shape, opts)?;
        conv_bwd_weight_with(self, x, &g, kernel, splits)
    }
}

fn conv_bwd_weight_with(
    dy: &Tensor,
    x: &Tensor,
    g: &ConvGeometry,
    kernel: Kernel,
    force_splits: Option<usize>,
) -> Result<Tensor> {
    // Rows x columns of the GEMM per workgroup.
    let [tile_rows, tile_cols] = match ConvPass::WeightGrad.forced(kernel)? {
        Kernel::Conv2dSgBwdWeight => [8, 512],
        _ => [64, 64],
    };
    let tiled = kernel == Kernel::Conv2dBwdWeightTiled;
    let (dy, x) = (dy.dense()?, x.dense()?);
    let shape = [g.c_out, g.c_in / g.groups, g.k[0], g.k[1]];
    let positions = g.n * g.oh * g.ow;
    if positions == 0 {
        return Tensor::zeros(&shape, dy.device());
    }
    let rows = g.c_out / g.groups;
    let cols = g.c_in / g.groups * g.k[0] * g.k[1];
    // The reduction over every output position is long and the output small: split it so
    // that enough workgroups run, then add the partial sums.
    let tiles = rows.div_ceil(tile_rows) * cols.div_ceil(tile_cols) * g.groups;
    let splits =
        super::tune::conv_weight_splits(dy.device(), tiled, tiles, positions, g.groups, MAX_GROUPS);
    let splits = force_splits.map_or(splits, |s| s.clamp(1, positions));
    let chunk = positions.div_ceil(splits);
    let partial = Tensor::uninit("conv2d_backward", &[splits, g.c_out, cols], dy.device())?;
    if rows > 0 && cols > 0 {
        let mut p = g.params(0, &Epilogue::default());
        p.splits = splits as u32;
        p.chunk = chunk as u32;
        // Err for a subgroup kernel on a device without suitable subgroups.
        dy.device().dispatch_variant(
            kernel,
            Variant::F32,
            &[dy.buffer(), x.buffer()],
            &[partial.buffer()],
            bytemuck::bytes_of(&p),
            [
                cols.div_ceil(tile_cols) as u32,
                rows.div_ceil(tile_rows) as u32,
                (g.groups * splits) as u32,
            ],
        )?;
    }
    let summed = if splits == 1 {
        partial
    } else {
        partial.sum(&[0], false)?
    };
    summed.reshape_to(&shape)
}

/// The geometry of conv2d for an (N, C, H, W) input and a (C_out, C / groups, kH, kW) weight,
/// with the checks of [`Tensor::conv2d`].
pub(crate) fn conv2d_geometry(
    x_dims: &[usize],
    w_dims: &[usize],
    opts: &Conv2dOptions,
) -> Result<ConvGeometry> {
    const OP: &str = "conv2d";
    if x_dims.len() != 4 || w_dims.len() != 4 {
        return Err(Error::shape(
            OP,
            format!("input {x_dims:?} and weight {w_dims:?} must have rank 4"),
        ));
    }
    let [n, c, h, w] = [x_dims[0], x_dims[1], x_dims[2], x_dims[3]];
    let [c_out, c_per_group, kh, kw] = [w_dims[0], w_dims[1], w_dims[2], w_dims[3]];
    let groups = opts.groups;
    if groups == 0 || opts.stride.contains(&0) || opts.dilation.contains(&0) {
        return Err(Error::invalid(
            OP,
            format!("stride, dilation and groups must be positive: {opts:?}"),
        ));
    }
    if c % groups != 0 || c_out % groups != 0 {
        return Err(Error::invalid(
            OP,
            format!("channels must be divisible by groups: {c} input and {c_out} output channels, {groups} groups"),
        ));
    }
    if c_per_group != c / groups {
        return Err(Error::shape(
            OP,
            format!(
                "weight {:?} needs {} input channels per group for input {:?} and groups {groups}",
                w_dims,
                c / groups,
                x_dims
            ),
        ));
    }
    let mut out_size = [0; 2];
    for (i, (&size, &k)) in [h, w].iter().zip(&[kh, kw]).enumerate() {
        let span = opts.dilation[i] as u128 * (k.max(1) as u128 - 1) + 1;
        let padded = size as u128 + 2 * opts.padding[i] as u128;
        if k == 0 || span > padded || padded > u32::MAX as u128 {
            return Err(Error::shape(
                OP,
                format!(
                    "kernel {:?} (dilated extent {span}) is larger than the padded input ({padded}) of shape {:?}",
                    [kh, kw],
                    x_dims
                ),
            ));
        }
        out_size[i] = ((padded - span) / opts.stride[i].max(1) as u128 + 1) as usize;
    }
    Ok(ConvGeometry {
        n,
        c_in: c,
        h,
        w,
        c_out,
        oh: out_size[0],
        ow: out_size[1],
        groups,
        k: [kh, kw],
        stride: opts.stride,
        padding: opts.padding,
        dilation: opts.dilation,
    })
}

fn check_common(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> Result<()> {
    x.check_device(op, w)?;
    if x.rank() != 4 {
        return Err(Error::shape(
            op,
            format!(
                "input must have rank 4 (N, C, H, W), got shape {:?}",
                x.dims()
            ),
        ));
    }
    if w.rank() != 4 {
        return Err(Error::shape(
            op,
            format!("weight must have rank 4, got shape {:?}", w.dims()),
        ));
    }
    if stride.contains(&0) {
        return Err(Error::invalid(
            op,
            format!("stride must be positive, got {stride:?}"),
        ));
    }
    if dilation.contains(&0) {
        return Err(Error::invalid(
            op,
            format!("dilation must be positive, got {dilation:?}"),
        ));
    }
    if groups == 0 {
        return Err(Error::invalid(op, "groups must be positive, got 0"));
    }
    if let Some(b) = bias {
        x.check_device(op, b)?;
    }
    Ok(())
}

fn check_bias(op: &'static str, bias: Option<&Tensor>, channels: usize) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [channels] => Err(Error::shape(
            op,
            format!("bias must have shape [{channels}], got {:?}", b.dims()),
        )),
        _ => Ok(()),
    }
}

fn add_bias(y: Tensor, bias: Option<&Tensor>, channels: usize) -> Result<Tensor> {
    match bias {
        Some(b) => y.add(&b.reshape_to(&[1, channels, 1, 1])?),
        None => Ok(y),
    }
}

/// The geometry of a transposed conv2d of an (N, C_in, H, W) input and a
/// (C_in, C_out / groups, kH, kW) weight, in the terms of the conv2d it transposes, with the
/// checks of [`Tensor::conv_transpose2d`].
pub(crate) fn conv_transpose2d_geometry(
    x_dims: &[usize],
    w_dims: &[usize],
    opts: &ConvTranspose2dOptions,
) -> Result<ConvGeometry> {
    const OP: &str = "conv_transpose2d";
    if x_dims.len() != 4 || w_dims.len() != 4 {
        return Err(Error::shape(
            OP,
            format!("input {x_dims:?} and weight {w_dims:?} must have rank 4"),
        ));
    }
    if opts.stride.contains(&0) || opts.dilation.contains(&0) || opts.groups == 0 {
        return Err(Error::invalid(
            OP,
            format!("stride, dilation and groups must be positive: {opts:?}"),
        ));
    }
    let [n, c_in, h, w] = [x_dims[0], x_dims[1], x_dims[2], x_dims[3]];
    let [wc, c_out_per_group, kh, kw] = [w_dims[0], w_dims[1], w_dims[2], w_dims[3]];
    let groups = opts.groups;
    if wc != c_in {
        return Err(Error::shape(
            OP,
            format!(
                "weight {:?} must have {c_in} input channels for input {:?}",
                w_dims, x_dims
            ),
        ));
    }
    if c_in % groups != 0 {
        return Err(Error::invalid(
            OP,
            format!("channels must be divisible by groups: {c_in} input channels, {groups} groups"),
        ));
    }
    let c_out = c_out_per_group * groups;
    let mut out_size = [0; 2];
    for i in 0..2 {
        let k = [kh, kw][i];
        if opts.output_padding[i] >= opts.stride[i] && opts.output_padding[i] >= opts.dilation[i] {
            return Err(Error::invalid(
                OP,
                format!(
                    "output_padding {:?} must be smaller than stride {:?} or dilation {:?}",
                    opts.output_padding, opts.stride, opts.dilation
                ),
            ));
        }
        let full = ([h, w][i].max(1) as u128 - 1) * opts.stride[i] as u128
            + opts.dilation[i] as u128 * (k.max(1) as u128 - 1)
            + opts.output_padding[i] as u128
            + 1;
        if full > u32::MAX as u128 {
            return Err(Error::shape(
                    OP,
                    format!("output size {full} for input {x_dims:?} and {opts:?} exceeds what kernels index"),
                ));
        }
        let full = full as usize;
        if k == 0 || full <= 2 * opts.padding[i] {
            return Err(Error::shape(
                OP,
                format!(
                    "padding {:?} leaves no output for input {:?} and kernel {:?}",
                    opts.padding,
                    x_dims,
                    [kh, kw]
                ),
            ));
        }
        out_size[i] = full - 2 * opts.padding[i];
    }
    // In conv2d terms: the output here is that convolution's input.
    let geo = ConvGeometry {
        n,
        c_in: c_out,
        h: out_size[0],
        w: out_size[1],
        c_out: c_in,
        oh: h,
        ow: w,
        groups,
        k: [kh, kw],
        stride: opts.stride,
        padding: opts.padding,
        dilation: opts.dilation,
    };
    Ok(geo)
}

/// The output shape of [`Tensor::conv_transpose2d`] for a batched input.
pub(crate) fn conv_transpose2d_shape(
    x_dims: &[usize],
    w_dims: &[usize],
    opts: &ConvTranspose2dOptions,
) -> Result<Vec<usize>> {
    let g = conv_transpose2d_geometry(x_dims, w_dims, opts)?;
    Ok(vec![g.n, g.c_in, g.h, g.w])
}

/// `act(conv2d(x, w) + b)` in one dispatch, for inference: `variant` gives the element type
/// of `x`, `w`, `b` and the result. Not recorded for autograd.
pub(crate) fn conv2d_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
    act: Option<(crate::UnaryOp, f32)>,
    variant: crate::kernels::Variant,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let (xb, unbatched, g) = conv2d_checked(x, weight, bias, opts)?;
    let shape = [g.n, g.c_out, g.oh, g.ow];
    let out = match variant {
        crate::kernels::Variant::F16 => crate::infer::graph::half_uninit(&shape, x.device())?,
        _ => Tensor::uninit(OP, &shape, x.device())?,
    };
    conv_fwd_into(
        &xb,
        weight,
        &g,
        &out,
        &Epilogue {
            bias,
            activation: act,
            variant,
            bias_rows: false,
        },
    )?;
    Ok(if unbatched {
        out.with_layout(crate::shape::Layout::contiguous(&shape[1..]))
    } else {
        out
    })
}

/// The one check of conv2d's operands, for training and frozen graphs alike: the batched
/// input, whether a batch axis was added, and the geometry.
fn conv2d_checked(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
) -> Result<(Tensor, bool, ConvGeometry)> {
    const OP: &str = "conv2d";
    let (xb, unbatched) = batched(x, 2)?;
    check_common(
        OP,
        &xb,
        weight,
        bias,
        opts.stride,
        opts.dilation,
        opts.groups,
    )?;
    check_bias(OP, bias, weight.dims()[0])?;
    let g = conv2d_geometry(xb.dims(), weight.dims(), opts)?;
    Ok((xb, unbatched, g))
}

/// Adds a batch axis to an unbatched (C, H, W) input; the flag says to remove it afterwards.
fn batched(x: &Tensor, spatial: usize) -> Result<(Tensor, bool)> {
    if x.rank() == spatial + 1 {
        Ok((x.unsqueeze(0)?, true))
    } else {
        Ok((x.clone(), false))
    }
}

impl Tensor {
    /// 2-D convolution of an (N, C, H, W) input (or unbatched (C, H, W)) with a
    /// (C_out, C / groups, kH, kW) weight and an optional (C_out) bias, as
    /// `torch.nn.functional.conv2d`.
    ///
    /// ```
    /// use kiln::{Conv2dOptions, Tensor};
    /// # let dev = kiln::Device::default_device()?;
    /// let x = Tensor::randn(&[2, 3, 9, 9], 0, &dev)?;
    /// let w = Tensor::randn(&[8, 3, 3, 3], 1, &dev)?;
    /// let opts = Conv2dOptions { stride: [2, 2], padding: [1, 1], ..Default::default() };
    /// assert_eq!(x.conv2d(&w, None, &opts)?.dims(), &[2, 8, 5, 5]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        opts: &Conv2dOptions,
    ) -> Result<Tensor> {
        self.conv2d_then(weight, bias, opts, false, false)
    }

    /// [`Tensor::conv2d`], then relu where `relu`: one pass, relu applied as the kernel stores
    /// (what [`crate::nn::Sequential`] runs for a convolution followed by a relu). Backward
    /// masks the gradient by the output where `mask`; without, the output's one consumer
    /// does (a max pooling, [`Tensor::conv2d_relu_max_pool2d`]).
    pub(crate) fn conv2d_then(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        opts: &Conv2dOptions,
        relu: bool,
        mask: bool,
    ) -> Result<Tensor> {
        let act = relu.then_some((super::elementwise::UnaryOp::Relu, 0.0));
        crate::infer::capture::traced(
            &[Some(self), Some(weight), bias]
                .into_iter()
                .flatten()
                .collect::<Vec<&Tensor>>(),
            |_| crate::infer::graph::OpKind::Conv2d {
                opts: *opts,
                bias: bias.is_some(),
                act,
            },
            || {
                let (x, unbatched, geo) = conv2d_checked(self, weight, bias, opts)?;
                let b = bias.map(Tensor::contiguous).transpose()?;
                let (x_grad, w_grad) = (x.requires_grad_flag(), weight.requires_grad_flag());
                let (y, cols) = conv_fwd_saving(&x, weight, &geo, b.as_ref(), relu)?;
                // The weight gradient reads the im2col matrix where the forward built one.
                let cols = cols.filter(|_| w_grad && crate::autograd::is_grad_enabled());
                let inputs: Vec<&Tensor> = [Some(&x), Some(weight), b.as_ref()]
                    .into_iter()
                    .flatten()
                    .collect();
                let y = record(y, &inputs, |y| Op::Conv2d {
                    x_is_cols: cols.is_some(),
                    x: w_grad.then(|| cols.unwrap_or_else(|| x.detach())),
                    w: x_grad.then(|| weight.detach()),
                    geometry: geo,
                    bias: b.is_some(),
                    relu_out: (relu && mask).then(|| y.detach()),
                });
                if unbatched {
                    y.squeeze(Some(0))
                } else {
                    Ok(y)
                }
            },
        )
    }

    /// 1-D convolution of an (N, C, L) input with a (C_out, C / groups, k) weight, as
    /// `torch.nn.functional.conv1d` (runs as a 2-D convolution of height 1).
    pub fn conv1d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<Tensor> {
        const OP: &str = "conv1d";
        if self.rank() != 3 || weight.rank() != 3 {
            return Err(Error::shape(
                OP,
                format!("input (N, C, L) and weight (C_out, C / groups, k) must have rank 3, got {:?} and {:?}", self.dims(), weight.dims()),
            ));
        }
        let opts = Conv2dOptions {
            stride: [1, stride],
            padding: [0, padding],
            dilation: [1, dilation],
            groups,
        };
        self.unsqueeze(2)?
            .conv2d(&weight.unsqueeze(2)?, bias, &opts)?
            .squeeze(Some(2))
    }

    /// Transposed 2-D convolution (the gradient of conv2d with respect to its input) of an
    /// (N, C_in, H, W) input with a (C_in, C_out / groups, kH, kW) weight, as
    /// `torch.nn.functional.conv_transpose2d`. Output size:
    /// `(H - 1) * stride - 2 * padding + dilation * (kH - 1) + output_padding + 1`.
    ///
    /// ```
    /// use kiln::{ConvTranspose2dOptions, Tensor};
    /// # let dev = kiln::Device::default_device()?;
    /// let x = Tensor::randn(&[1, 4, 5, 5], 0, &dev)?;
    /// let w = Tensor::randn(&[4, 2, 3, 3], 1, &dev)?;
    /// let opts = ConvTranspose2dOptions { stride: [2, 2], padding: [1, 1], output_padding: [1, 1], ..Default::default() };
    /// assert_eq!(x.conv_transpose2d(&w, None, &opts)?.dims(), &[1, 2, 10, 10]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn conv_transpose2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        opts: &ConvTranspose2dOptions,
    ) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[Some(self), Some(weight), bias]
                .into_iter()
                .flatten()
                .collect::<Vec<&Tensor>>(),
            |_| crate::infer::graph::OpKind::ConvTranspose2d {
                opts: *opts,
                bias: bias.is_some(),
            },
            || {
                const OP: &str = "conv_transpose2d";
                let (x, unbatched) = batched(self, 2)?;
                check_common(
                    OP,
                    &x,
                    weight,
                    bias,
                    opts.stride,
                    opts.dilation,
                    opts.groups,
                )?;
                let geo = conv_transpose2d_geometry(x.dims(), weight.dims(), opts)?;
                let c_out = geo.c_in;
                check_bias(OP, bias, c_out)?;
                let y = conv_bwd_input(&x, weight, &geo)?;
                let (x_grad, w_grad) = (x.requires_grad_flag(), weight.requires_grad_flag());
                let y = record(y, &[&x, weight], |_| Op::ConvTranspose2d {
                    x: w_grad.then(|| x.detach()),
                    w: x_grad.then(|| weight.detach()),
                    geometry: geo,
                });
                let y = add_bias(y, bias, c_out)?;
                if unbatched {
                    y.squeeze(Some(0))
                } else {
                    Ok(y)
                }
            },
        )
    }
}
