//! The captured graph: nodes holding an op, its attributes and its inputs, in topological
//! order; sizes that depend on the batch are linear in it ([`Dim`]). Each op has one shape
//! rule here (checked arithmetic, used before any GPU work) and one way to run: the same
//! tensor op that training calls.

use crate::error::{Error, Result};
use crate::kernels::Variant;
use crate::ops::elementwise::{BinaryOp, UnaryOp};
use crate::ops::reduce::ReduceOp;
use crate::shape::{broadcast_shapes, checked_numel, normalize_axes, normalize_axis, MAX_RANK};
use crate::tensor::Tensor;
use crate::Device;
use crate::{Conv2dOptions, ConvTranspose2dOptions, Pool2dOptions};

/// Largest size, stride, padding or other integer a graph may hold: kernels take u32.
pub(crate) const MAX_ATTR: usize = u32::MAX as usize;

/// A size `per_batch * N + fixed`, where `N` is the batch size of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dim {
    /// Multiple of the batch size.
    pub per_batch: i64,
    /// Constant part.
    pub fixed: i64,
}

impl Dim {
    /// A size that does not depend on the batch.
    pub fn fixed(v: usize) -> Dim {
        Dim {
            per_batch: 0,
            fixed: v as i64,
        }
    }

    /// The size for batch `n`; `Err` when negative or beyond what kernels take.
    pub fn at(self, n: usize) -> Result<usize> {
        let v = (self.per_batch as i128) * (n as i128) + self.fixed as i128;
        if v < 0 || v > MAX_ATTR as i128 {
            return Err(Error::invalid(
                "InferenceModel",
                format!(
                    "size {} * N + {} is {v} for batch size {n}",
                    self.per_batch, self.fixed
                ),
            ));
        }
        Ok(v as usize)
    }

    /// True when the size depends on the batch.
    pub fn is_dynamic(self) -> bool {
        self.per_batch != 0
    }
}

pub(crate) fn dims_at(dims: &[Dim], n: usize) -> Result<Vec<usize>> {
    dims.iter().map(|d| d.at(n)).collect()
}

/// Element type of a value in the graph: the tensors' [`crate::DType`] (graph values are f32
/// or f16).
pub use crate::tensor::DType;

/// Where a node's operand comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Src {
    /// The k-th input of the model.
    Input(usize),
    /// The k-th constant (weights and buffers).
    Const(usize),
    /// The output of the k-th node.
    Node(usize),
}

/// An activation fused into a producing kernel.
pub(crate) type Act = Option<(UnaryOp, f32)>;

/// The ops a graph can hold.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum OpKind {
    Reshape {
        shape: Vec<Dim>,
    },
    Permute {
        perm: Vec<usize>,
    },
    Expand {
        shape: Vec<Dim>,
    },
    Narrow {
        axis: usize,
        start: Dim,
        len: Dim,
    },
    Unary {
        op: UnaryOp,
        alpha: f32,
        beta: f32,
    },
    Binary {
        op: BinaryOp,
    },
    BinaryScalar {
        op: BinaryOp,
        scalar: f32,
        left: bool,
    },
    Where,
    Reduce {
        op: ReduceOp,
        axes: Vec<isize>,
        keepdim: bool,
        correction: f32,
    },
    Softmax {
        axis: isize,
        log: bool,
    },
    Matmul,
    /// `act(x W^T + b)`: operands x, W (out, in), and b when `bias`.
    Linear {
        bias: bool,
        act: Act,
    },
    /// `act(conv2d(x, w) + b)`: operands x, w, and b when `bias`.
    Conv2d {
        opts: Conv2dOptions,
        bias: bool,
        act: Act,
    },
    ConvTranspose2d {
        opts: ConvTranspose2dOptions,
        bias: bool,
    },
    Pool {
        opts: Pool2dOptions,
        max: bool,
    },
    AdaptiveAvgPool {
        size: [usize; 2],
    },
    /// Eval-mode batch norm: operands x, running mean, running var, then weight and bias.
    BatchNorm {
        eps: f32,
        weight: bool,
        bias: bool,
    },
    LayerNorm {
        shape: Vec<usize>,
        eps: f32,
        weight: bool,
        bias: bool,
    },
    GroupNorm {
        groups: usize,
        eps: f32,
        weight: bool,
        bias: bool,
    },
    Concat {
        axis: isize,
    },
    IndexSelect {
        axis: isize,
    },
    Gather {
        axis: isize,
    },
    Full {
        shape: Vec<Dim>,
        value: f32,
    },
    /// A change of element type (inserted by `to_half`).
    Cast {
        to: DType,
    },
    /// Int8 quantization of rows along the last axis, into packed words `(rows, k4)` (I32).
    QuantizeRows {
        scale: f32,
        zero_point: i32,
    },
    /// The quantized patch rows of a convolution's input `(n * oh * ow, k4)` (I32).
    QuantizeIm2col {
        scale: f32,
        zero_point: i32,
        kernel: [usize; 2],
        opts: Conv2dOptions,
    },
    /// Int8 quantization of an NCHW tensor into its pixels, channels innermost:
    /// `(n h w, k4)` (I32), the input of a windowed [`OpKind::QGemm`].
    QuantizeNhwc {
        scale: f32,
        zero_point: i32,
    },
    /// The integer product of quantized activations and weights (operands: activation words
    /// `(m, k4)`, weight words `(n, k4)`, per-channel data laid out by
    /// `ops::quant::channel_layout`), dequantized with `act`
    /// fused: f32 `(m, n)`, or `(m / (oh ow), n, oh, ow)` with `spatial`. With `window`, a
    /// convolution over quantized pixels ([`OpKind::QuantizeNhwc`]): the weights are
    /// `(n, kh kw k4)` and `spatial` is the window's output grid. With `int8_out`, the
    /// result is requantized to that zero point instead (the channel data holds multipliers
    /// and shifts; `act` is none or relu): int8 rows `(m, k4)`, as the quantization of the
    /// f32 result would give them to the next integer product.
    QGemm {
        n: usize,
        act: Act,
        spatial: Option<[usize; 2]>,
        window: Option<crate::ops::quant::QWindow>,
        int8_out: Option<i32>,
        /// Activations quantized at run time ([`OpKind::QuantizeDynamic`]): 4 header words,
        /// then the rows; the channel data holds weight sums, scales and f32 biases.
        dynamic: bool,
    },
    /// Int8 quantization of rows along the last axis with the range of the tensor itself,
    /// computed at run time: `(4 + rows * k4)` words, the scale and zero point first.
    QuantizeDynamic,
}

use crate::ops::quant::QOut;

/// Words of the per-channel data of an integer product of `n` channels writing `out`.
fn channel_data_len(n: usize, out: &QOut) -> usize {
    let (planes, plane) = crate::ops::quant::channel_layout(n, out);
    planes * plane
}

/// The activations a producing kernel's epilogue applies.
pub(crate) fn fusable_activation(op: UnaryOp) -> bool {
    matches!(
        op,
        UnaryOp::Relu
            | UnaryOp::LeakyRelu
            | UnaryOp::Sigmoid
            | UnaryOp::Tanh
            | UnaryOp::Gelu
            | UnaryOp::Silu
    )
}

impl OpKind {
    /// The op's name in errors and in the artifact.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            OpKind::Reshape { .. } => "reshape",
            OpKind::Permute { .. } => "permute",
            OpKind::Expand { .. } => "expand",
            OpKind::Narrow { .. } => "narrow",
            OpKind::Unary { .. } => "unary",
            OpKind::Binary { .. } => "binary",
            OpKind::BinaryScalar { .. } => "binary_scalar",
            OpKind::Where => "where",
            OpKind::Reduce { .. } => "reduce",
            OpKind::Softmax { .. } => "softmax",
            OpKind::Matmul => "matmul",
            OpKind::Linear { .. } => "linear",
            OpKind::Conv2d { .. } => "conv2d",
            OpKind::ConvTranspose2d { .. } => "conv_transpose2d",
            OpKind::Pool { .. } => "pool2d",
            OpKind::AdaptiveAvgPool { .. } => "adaptive_avg_pool2d",
            OpKind::BatchNorm { .. } => "batch_norm",
            OpKind::LayerNorm { .. } => "layer_norm",
            OpKind::GroupNorm { .. } => "group_norm",
            OpKind::Concat { .. } => "concat",
            OpKind::IndexSelect { .. } => "index_select",
            OpKind::Gather { .. } => "gather",
            OpKind::Full { .. } => "full",
            OpKind::Cast { .. } => "cast",
            OpKind::QuantizeRows { .. } => "quantize_rows",
            OpKind::QuantizeIm2col { .. } => "quantize_im2col",
            OpKind::QuantizeNhwc { .. } => "quantize_nhwc",
            OpKind::QGemm { .. } => "qgemm",
            OpKind::QuantizeDynamic => "quantize_dynamic",
        }
    }

    /// The number of operands the op takes (`None`: one or more).
    pub(crate) fn arity(&self) -> Option<usize> {
        let opt = |b: bool| b as usize;
        Some(match self {
            OpKind::Full { .. } => 0,
            OpKind::Reshape { .. }
            | OpKind::Permute { .. }
            | OpKind::Expand { .. }
            | OpKind::Narrow { .. }
            | OpKind::Unary { .. }
            | OpKind::BinaryScalar { .. }
            | OpKind::Reduce { .. }
            | OpKind::Softmax { .. }
            | OpKind::Pool { .. }
            | OpKind::AdaptiveAvgPool { .. }
            | OpKind::Cast { .. }
            | OpKind::QuantizeRows { .. }
            | OpKind::QuantizeIm2col { .. }
            | OpKind::QuantizeNhwc { .. }
            | OpKind::QuantizeDynamic => 1,
            OpKind::QGemm { .. } => 3,
            OpKind::Binary { .. }
            | OpKind::Matmul
            | OpKind::IndexSelect { .. }
            | OpKind::Gather { .. } => 2,
            OpKind::Where => 3,
            OpKind::Linear { bias, .. }
            | OpKind::Conv2d { bias, .. }
            | OpKind::ConvTranspose2d { bias, .. } => 2 + opt(*bias),
            OpKind::BatchNorm { weight, bias, .. } => 3 + opt(*weight) + opt(*bias),
            OpKind::LayerNorm { weight, bias, .. } | OpKind::GroupNorm { weight, bias, .. } => {
                1 + opt(*weight) + opt(*bias)
            }
            OpKind::Concat { .. } => return None,
        })
    }

    /// The sizes that may depend on the batch, for merging traces at several batch sizes.
    pub(crate) fn dims_mut(&mut self) -> Vec<&mut Dim> {
        match self {
            OpKind::Reshape { shape } | OpKind::Expand { shape } | OpKind::Full { shape, .. } => {
                shape.iter_mut().collect()
            }
            OpKind::Narrow { start, len, .. } => vec![start, len],
            _ => Vec::new(),
        }
    }

    /// The element type of the op's result, for ops that fix it (the int8 ops).
    pub(crate) fn output_dtype(&self) -> Option<DType> {
        match self {
            OpKind::QuantizeRows { .. }
            | OpKind::QuantizeIm2col { .. }
            | OpKind::QuantizeNhwc { .. }
            | OpKind::QuantizeDynamic
            | OpKind::QGemm {
                int8_out: Some(_), ..
            } => Some(DType::I32),
            OpKind::QGemm { .. } => Some(DType::F32),
            _ => None,
        }
    }

    /// The element type of the operands of a node of type `out` (casts aside): int8 words for
    /// the integer product, f32 for quantization, the node's own type for every other op.
    pub(crate) fn operand_dtype(&self, out: DType) -> DType {
        match self {
            OpKind::QuantizeRows { .. }
            | OpKind::QuantizeIm2col { .. }
            | OpKind::QuantizeNhwc { .. }
            | OpKind::QuantizeDynamic => DType::F32,
            OpKind::QGemm { .. } => DType::I32,
            _ => out,
        }
    }

    /// True when the op has a half-precision kernel (others run in f32 between casts).
    pub(crate) fn has_half_kernel(&self) -> bool {
        match self {
            OpKind::Linear { .. }
            | OpKind::Conv2d { .. }
            | OpKind::Pool { .. }
            | OpKind::AdaptiveAvgPool { .. }
            | OpKind::Reshape { .. }
            | OpKind::Cast { .. } => true,
            OpKind::Unary { op, .. } => fusable_activation(*op) || *op == UnaryOp::Identity,
            _ => false,
        }
    }

    /// Checks the attributes alone: sizes within kernel range, positive strides and groups.
    pub(crate) fn check_attributes(&self) -> Result<()> {
        let op = self.name();
        let bad = |msg: String| Err(Error::invalid(op, msg));
        let big = |v: &[usize]| v.iter().any(|&x| x > MAX_ATTR);
        let finite = |v: f32| v.is_finite();
        match self {
            OpKind::Permute { perm } => {
                let mut seen = [false; MAX_RANK];
                if perm.len() > MAX_RANK
                    || perm
                        .iter()
                        .any(|&p| p >= perm.len() || std::mem::replace(&mut seen[p], true))
                {
                    return bad(format!("{perm:?} is not a permutation"));
                }
            }
            OpKind::Conv2d { opts, .. } => {
                let all = [opts.stride, opts.padding, opts.dilation].concat();
                if big(&all) || opts.groups > MAX_ATTR {
                    return bad(format!("{opts:?} holds a size beyond {MAX_ATTR}"));
                }
                if opts.stride.contains(&0) || opts.dilation.contains(&0) || opts.groups == 0 {
                    return bad(format!(
                        "stride, dilation and groups must be positive: {opts:?}"
                    ));
                }
            }
            OpKind::ConvTranspose2d { opts, .. } => {
                let all = [
                    opts.stride,
                    opts.padding,
                    opts.dilation,
                    opts.output_padding,
                ]
                .concat();
                if big(&all) || opts.groups > MAX_ATTR {
                    return bad(format!("{opts:?} holds a size beyond {MAX_ATTR}"));
                }
                if opts.stride.contains(&0) || opts.dilation.contains(&0) || opts.groups == 0 {
                    return bad(format!(
                        "stride, dilation and groups must be positive: {opts:?}"
                    ));
                }
            }
            OpKind::Pool { opts, .. } => {
                let all = [opts.kernel, opts.stride, opts.padding, opts.dilation].concat();
                if big(&all) {
                    return bad(format!("{opts:?} holds a size beyond {MAX_ATTR}"));
                }
                if opts.kernel.contains(&0)
                    || opts.stride.contains(&0)
                    || opts.dilation.contains(&0)
                {
                    return bad(format!(
                        "kernel, stride and dilation must be positive: {opts:?}"
                    ));
                }
            }
            OpKind::QuantizeRows { scale, zero_point }
            | OpKind::QuantizeNhwc {
                scale, zero_point, ..
            }
            | OpKind::QuantizeIm2col {
                scale, zero_point, ..
            } => {
                if !(scale.is_finite() && *scale > 0.0 && (-128..=127).contains(zero_point)) {
                    return bad(format!(
                        "scale {scale} must be finite and positive, zero point {zero_point} \
                         in -128..=127"
                    ));
                }
                if let OpKind::QuantizeIm2col { kernel, opts, .. } = self {
                    let all = [*kernel, opts.stride, opts.padding, opts.dilation].concat();
                    if big(&all)
                        || kernel.contains(&0)
                        || opts.stride.contains(&0)
                        || opts.dilation.contains(&0)
                    {
                        return bad(format!("window {kernel:?} {opts:?}"));
                    }
                }
            }
            OpKind::Cast { to } if !matches!(to, DType::F32 | DType::F16) => {
                return bad(format!(
                    "casts are between f32 and f16, not to {}",
                    to.name()
                ));
            }
            OpKind::QGemm {
                n,
                spatial,
                window,
                int8_out,
                act,
                dynamic,
            } if *n == 0
                || *n > MAX_ATTR
                || spatial.is_some_and(|s| big(&s))
                || window.is_some_and(|w| {
                    let all = [w.kernel, w.stride, w.dilation, w.grid].concat();
                    big(&all)
                        || big(&w.padding)
                        || all.contains(&0)
                        || w.output() != *spatial
                        || !(-128..=127).contains(&w.zero_point)
                })
                || int8_out.is_some_and(|z| {
                    !(-128..=127).contains(&z)
                        || *dynamic
                        || !matches!(act, None | Some((UnaryOp::Relu, _)))
                }) =>
            {
                return bad(format!(
                    "{n} channels, outputs {spatial:?}, window {window:?}, int8 out {int8_out:?}, \
                     activation {act:?}, dynamic {dynamic}"
                ));
            }
            OpKind::AdaptiveAvgPool { size } if (size.contains(&0) || big(size)) => {
                return bad(format!("output size {size:?} must be in 1..={MAX_ATTR}"));
            }
            OpKind::BatchNorm { eps, .. }
            | OpKind::LayerNorm { eps, .. }
            | OpKind::GroupNorm { eps, .. } => {
                if !finite(*eps) || *eps < 0.0 {
                    return bad(format!("eps must be finite and >= 0, got {eps}"));
                }
                if let OpKind::GroupNorm { groups: 0, .. } = self {
                    return bad("groups must be positive, got 0".into());
                }
                if let OpKind::LayerNorm { shape, .. } = self {
                    if shape.is_empty() || shape.len() > MAX_RANK || big(shape) {
                        return bad(format!("normalized shape {shape:?} is empty or too large"));
                    }
                }
            }
            OpKind::Reduce { axes, .. } if axes.len() > MAX_RANK => {
                return bad(format!("{} axes exceed rank {MAX_RANK}", axes.len()));
            }
            OpKind::Reshape { shape } | OpKind::Expand { shape } | OpKind::Full { shape, .. } => {
                if shape.len() > MAX_RANK {
                    return bad(format!("rank {} exceeds {MAX_RANK}", shape.len()));
                }
                if shape.iter().any(|d| {
                    d.per_batch.unsigned_abs() > MAX_ATTR as u64
                        || d.fixed.unsigned_abs() > MAX_ATTR as u64
                }) {
                    return bad(format!("a size of {shape:?} is beyond {MAX_ATTR}"));
                }
            }
            OpKind::Narrow { start, len, .. } => {
                for d in [start, len] {
                    if d.per_batch.unsigned_abs() > MAX_ATTR as u64
                        || d.fixed.unsigned_abs() > MAX_ATTR as u64
                    {
                        return bad(format!("size {d:?} is beyond {MAX_ATTR}"));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The output shape for operands of `inputs` shapes at batch `n`, with the checks the
    /// tensor op makes; no GPU work.
    pub(crate) fn output_shape(&self, inputs: &[&[usize]], n: usize) -> Result<Vec<usize>> {
        let op = self.name();
        self.check_attributes()?;
        if let Some(a) = self.arity() {
            if inputs.len() != a {
                return Err(Error::invalid(
                    op,
                    format!("takes {a} operands, got {}", inputs.len()),
                ));
            }
        } else if inputs.is_empty() {
            return Err(Error::invalid(op, "takes at least one operand"));
        }
        let x = inputs.first().copied().unwrap_or(&[]);
        let shape_err = |msg: String| Error::shape(op, msg);
        let numel = |s: &[usize]| {
            checked_numel(s).ok_or_else(|| shape_err(format!("shape {s:?} overflows")))
        };
        for s in inputs {
            numel(s)?;
        }
        let out = match self {
            OpKind::Reshape { shape } => {
                let s = dims_at(shape, n)?;
                if numel(&s)? != numel(x)? {
                    return Err(shape_err(format!("cannot view {x:?} as {s:?}")));
                }
                s
            }
            OpKind::Permute { perm } => {
                if perm.len() != x.len() {
                    return Err(shape_err(format!("permutation {perm:?} for shape {x:?}")));
                }
                perm.iter().map(|&p| x[p]).collect()
            }
            OpKind::Expand { shape } => {
                let s = dims_at(shape, n)?;
                let b = broadcast_shapes(op, x, &s)?;
                if b != s {
                    return Err(shape_err(format!("cannot expand {x:?} to {s:?}")));
                }
                s
            }
            OpKind::Narrow { axis, start, len } => {
                let (start, len) = (start.at(n)?, len.at(n)?);
                if *axis >= x.len() || start + len > x[*axis] {
                    return Err(shape_err(format!(
                        "{len} elements from {start} of axis {axis} of {x:?}"
                    )));
                }
                let mut s = x.to_vec();
                s[*axis] = len;
                s
            }
            OpKind::Unary { .. } | OpKind::BinaryScalar { .. } | OpKind::Cast { .. } => x.to_vec(),
            OpKind::Binary { .. } => broadcast_shapes(op, x, inputs[1])?,
            OpKind::Where => broadcast_shapes(op, &broadcast_shapes(op, x, inputs[1])?, inputs[2])?,
            OpKind::Reduce {
                op: r,
                axes,
                keepdim,
                ..
            } => {
                let axes = if matches!(r, ReduceOp::ArgMax | ReduceOp::ArgMin) && axes.len() != 1 {
                    return Err(shape_err(format!("takes one axis, got {axes:?}")));
                } else {
                    normalize_axes(op, axes, x.len())?
                };
                let all = axes.is_empty();
                let mut s = Vec::new();
                for (i, &d) in x.iter().enumerate() {
                    if all || axes.contains(&i) {
                        if *keepdim {
                            s.push(1);
                        }
                    } else {
                        s.push(d);
                    }
                }
                s
            }
            OpKind::Softmax { axis, .. } => {
                normalize_axis(op, *axis, x.len().max(1))?;
                x.to_vec()
            }
            OpKind::Matmul => {
                let b = inputs[1];
                if x.is_empty() || b.is_empty() {
                    return Err(shape_err(format!(
                        "operands {x:?} and {b:?} need rank 1 or more"
                    )));
                }
                let a2: Vec<usize> = if x.len() == 1 {
                    vec![1, x[0]]
                } else {
                    x.to_vec()
                };
                let b2: Vec<usize> = if b.len() == 1 {
                    vec![b[0], 1]
                } else {
                    b.to_vec()
                };
                let (ra, rb) = (a2.len(), b2.len());
                if a2[ra - 1] != b2[rb - 2] {
                    return Err(shape_err(format!("inner sizes differ: {x:?} x {b:?}")));
                }
                let mut s = broadcast_shapes(op, &a2[..ra - 2], &b2[..rb - 2])?;
                if x.len() > 1 {
                    s.push(a2[ra - 2]);
                }
                if b.len() > 1 {
                    s.push(b2[rb - 1]);
                }
                s
            }
            OpKind::Linear { bias, .. } => {
                let w = inputs[1];
                if w.len() != 2 || x.is_empty() || x[x.len() - 1] != w[1] {
                    return Err(shape_err(format!(
                        "input {x:?} must end in the {:?} features of weight {w:?}",
                        w.get(1)
                    )));
                }
                if *bias && inputs[2] != [w[0]] {
                    return Err(shape_err(format!(
                        "bias {:?} must be [{}]",
                        inputs[2], w[0]
                    )));
                }
                let mut s = x.to_vec();
                s[x.len() - 1] = w[0];
                s
            }
            OpKind::Conv2d { opts, bias, .. } => {
                let unbatched = x.len() == 3;
                let xb: Vec<usize> = if unbatched {
                    [&[1], x].concat()
                } else {
                    x.to_vec()
                };
                let g = crate::ops::conv::conv2d_geometry(&xb, inputs[1], opts)?;
                if *bias && inputs[2] != [g.c_out] {
                    return Err(shape_err(format!(
                        "bias {:?} must be [{}]",
                        inputs[2], g.c_out
                    )));
                }
                let s = vec![g.n, g.c_out, g.oh, g.ow];
                if unbatched {
                    s[1..].to_vec()
                } else {
                    s
                }
            }
            OpKind::ConvTranspose2d { opts, bias } => {
                let unbatched = x.len() == 3;
                let xb: Vec<usize> = if unbatched {
                    [&[1], x].concat()
                } else {
                    x.to_vec()
                };
                let s = crate::ops::conv::conv_transpose2d_shape(&xb, inputs[1], opts)?;
                if *bias && inputs[2] != [s[1]] {
                    return Err(shape_err(format!(
                        "bias {:?} must be [{}]",
                        inputs[2], s[1]
                    )));
                }
                if unbatched {
                    s[1..].to_vec()
                } else {
                    s
                }
            }
            OpKind::Pool { opts, max } => {
                let unbatched = x.len() == 3;
                let xb: Vec<usize> = if unbatched {
                    [&[1], x].concat()
                } else {
                    x.to_vec()
                };
                let mode = if *max {
                    crate::ops::pool::MODE_MAX
                } else {
                    crate::ops::pool::MODE_AVG_WITH_PAD
                };
                if !*max && opts.dilation != [1, 1] {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "average pooling needs dilation [1, 1], got {:?}",
                            opts.dilation
                        ),
                    ));
                }
                let g = crate::ops::pool::geometry(op, &xb, opts, mode)?;
                let s = vec![g.n, g.c, g.oh, g.ow];
                if unbatched {
                    s[1..].to_vec()
                } else {
                    s
                }
            }
            OpKind::AdaptiveAvgPool { size } => {
                if !(x.len() == 3 || x.len() == 4) || x[x.len() - 1] == 0 || x[x.len() - 2] == 0 {
                    return Err(shape_err(format!(
                        "input {x:?} must be a non-empty (N, C, H, W)"
                    )));
                }
                let mut s = x.to_vec();
                let r = s.len();
                s[r - 2] = size[0];
                s[r - 1] = size[1];
                s
            }
            OpKind::BatchNorm { .. } => {
                if x.len() < 2 {
                    return Err(shape_err(format!("input {x:?} must be (N, C, ...)")));
                }
                if inputs[1..].iter().any(|s| *s != [x[1]]) {
                    return Err(shape_err(format!(
                        "statistics and affine must be [{}]",
                        x[1]
                    )));
                }
                x.to_vec()
            }
            OpKind::LayerNorm { shape, .. } => {
                let k = shape.len();
                if k > x.len() || x[x.len() - k..] != shape[..] {
                    return Err(shape_err(format!(
                        "normalized shape {shape:?} must end {x:?}"
                    )));
                }
                if inputs[1..].iter().any(|s| *s != &shape[..]) {
                    return Err(shape_err(format!("weight and bias must be {shape:?}")));
                }
                x.to_vec()
            }
            OpKind::GroupNorm { groups, .. } => {
                if x.len() < 2 || x[1] % groups != 0 {
                    return Err(shape_err(format!(
                        "input {x:?} must be (N, C, ...) with C divisible by {groups}"
                    )));
                }
                if inputs[1..].iter().any(|s| *s != [x[1]]) {
                    return Err(shape_err(format!("weight and bias must be [{}]", x[1])));
                }
                x.to_vec()
            }
            OpKind::Concat { axis } => {
                let ax = normalize_axis(op, *axis, x.len())?;
                let mut s = x.to_vec();
                s[ax] = 0;
                for t in inputs {
                    if t.len() != x.len()
                        || t.iter().enumerate().any(|(i, &d)| i != ax && d != x[i])
                    {
                        return Err(shape_err(format!(
                            "shapes {x:?} and {t:?} differ off axis {ax}"
                        )));
                    }
                    s[ax] = s[ax]
                        .checked_add(t[ax])
                        .ok_or_else(|| shape_err("size overflows".into()))?;
                }
                s
            }
            OpKind::IndexSelect { axis } => {
                let ax = normalize_axis(op, *axis, x.len())?;
                if inputs[1].len() != 1 {
                    return Err(shape_err(format!(
                        "indices must be 1-D, got {:?}",
                        inputs[1]
                    )));
                }
                let mut s = x.to_vec();
                s[ax] = inputs[1][0];
                s
            }
            OpKind::Gather { axis } => {
                normalize_axis(op, *axis, x.len())?;
                if inputs[1].len() != x.len() {
                    return Err(shape_err(format!(
                        "index {:?} must have the rank of {x:?}",
                        inputs[1]
                    )));
                }
                inputs[1].to_vec()
            }
            OpKind::Full { shape, .. } => dims_at(shape, n)?,
            OpKind::QuantizeRows { .. } => {
                let k = *x.last().unwrap_or(&0);
                if k == 0 {
                    return Err(shape_err(format!("rows of {x:?} are empty")));
                }
                vec![numel(x)? / k, crate::ops::quant::padded_words(k)]
            }
            OpKind::QuantizeNhwc { .. } => {
                let [n, c, h, w] = x else {
                    return Err(shape_err(format!("input {x:?} must be NCHW")));
                };
                if *c == 0 {
                    return Err(shape_err(format!("input {x:?} has no channels")));
                }
                vec![n * h * w, crate::ops::quant::padded_words(*c)]
            }
            OpKind::QuantizeIm2col { kernel, opts, .. } => {
                let c = x.get(1).copied().unwrap_or(0);
                let g = crate::ops::conv::conv2d_geometry(
                    x,
                    &[1, c, kernel[0], kernel[1]],
                    &Conv2dOptions { groups: 1, ..*opts },
                )?;
                vec![
                    g.n * g.oh * g.ow,
                    crate::ops::quant::padded_words(c * kernel[0] * kernel[1]),
                ]
            }
            OpKind::QuantizeDynamic => {
                let k = *x.last().unwrap_or(&0);
                if k == 0 {
                    return Err(shape_err(format!("rows of {x:?} are empty")));
                }
                let words = (numel(x)? / k)
                    .checked_mul(crate::ops::quant::padded_words(k))
                    .and_then(|w| w.checked_add(4))
                    .ok_or_else(|| shape_err(format!("{x:?} overflows")))?;
                vec![words]
            }
            OpKind::QGemm {
                n: ch,
                spatial,
                dynamic: true,
                window,
                ..
            } => {
                let (w, c) = (inputs[1], inputs[2]);
                let k4 = w.get(1).copied().unwrap_or(0);
                let ok = x.len() == 1
                    && w.len() == 2
                    && w[0] == *ch
                    && k4 > 0
                    && k4.is_multiple_of(4)
                    && x[0] >= 4
                    && (x[0] - 4).is_multiple_of(k4)
                    && c == [channel_data_len(*ch, &QOut::Dynamic { act: None })]
                    && spatial.is_none()
                    && window.is_none();
                if !ok {
                    return Err(shape_err(format!(
                        "activation words {x:?}, weights {w:?} and channel data {c:?} for {ch} channels"
                    )));
                }
                vec![(x[0] - 4) / k4, *ch]
            }
            OpKind::QGemm {
                n: ch,
                spatial,
                window,
                int8_out,
                ..
            } => {
                let (w, c) = (inputs[1], inputs[2]);
                let taps = window.map_or(1, |w| w.kernel[0] * w.kernel[1]);
                let ok = x.len() == 2
                    && w.len() == 2
                    && w[0] == *ch
                    && x[1] > 0
                    && x[1].is_multiple_of(4)
                    && Some(w[1]) == x[1].checked_mul(taps)
                    && c == [channel_data_len(
                        *ch,
                        &match int8_out {
                            Some(zy) => QOut::I8 {
                                zy: *zy,
                                relu: false,
                            },
                            None => QOut::F32 { act: None },
                        },
                    )];
                if !ok {
                    return Err(shape_err(format!(
                        "activations {x:?}, weights {w:?} and channel data {c:?} for {ch} channels"
                    )));
                }
                let out = match (window, spatial) {
                    (None, None) => vec![x[0], *ch],
                    (None, Some([oh, ow])) => {
                        let ohw = oh * ow;
                        if ohw == 0 || !x[0].is_multiple_of(ohw) {
                            return Err(shape_err(format!("{} rows of {oh} x {ow} outputs", x[0])));
                        }
                        vec![x[0] / ohw, *ch, *oh, *ow]
                    }
                    (Some(win), Some([oh, ow])) => {
                        let px = win.grid[0] * win.grid[1];
                        if px == 0 || !x[0].is_multiple_of(px) {
                            return Err(shape_err(format!(
                                "{} pixels in images of {:?}",
                                x[0], win.grid
                            )));
                        }
                        vec![x[0] / px, *ch, *oh, *ow]
                    }
                    (Some(_), None) => {
                        return Err(shape_err("a window without its output grid".into()));
                    }
                };
                match int8_out {
                    // Rows of output positions, channels packed.
                    Some(_) => {
                        let rows = out[0]
                            .checked_mul(*out.get(2).unwrap_or(&1))
                            .and_then(|r| r.checked_mul(*out.get(3).unwrap_or(&1)))
                            .ok_or_else(|| shape_err(format!("{out:?} overflows")))?;
                        vec![rows, crate::ops::quant::padded_words(*ch)]
                    }
                    None => out,
                }
            }
        };
        if out.len() > MAX_RANK {
            return Err(shape_err(format!("rank {} exceeds {MAX_RANK}", out.len())));
        }
        let count = numel(&out)?;
        if count > MAX_ATTR {
            return Err(shape_err(format!(
                "{count} elements exceed what kernels index"
            )));
        }
        Ok(out)
    }

    /// Runs the op on `inputs` (f32) through the tensor ops every caller uses.
    /// `dev` is where ops without operands (`full`) allocate.
    pub(crate) fn apply(&self, inputs: &[&Tensor], n: usize, dev: &Device) -> Result<Tensor> {
        if let OpKind::Full { shape, value } = self {
            return Tensor::full(&dims_at(shape, n)?, *value, dev);
        }
        let x = inputs[0];
        let opt = |present: bool, i: usize| present.then(|| inputs[i]);
        match self {
            OpKind::Reshape { shape } => x.reshape_to(&dims_at(shape, n)?),
            OpKind::Permute { perm } => {
                let p: Vec<isize> = perm.iter().map(|&a| a as isize).collect();
                x.permute(&p)
            }
            OpKind::Expand { shape } => x.expand(&dims_at(shape, n)?),
            OpKind::Narrow { axis, start, len } => {
                x.narrow(*axis as isize, start.at(n)?, len.at(n)?)
            }
            OpKind::Unary { op, alpha, beta } => {
                crate::ops::elementwise::unary(x, *op, *alpha, *beta)
            }
            OpKind::Binary { op } => crate::ops::elementwise::binary(x, inputs[1], *op),
            OpKind::BinaryScalar { op, scalar, left } => {
                crate::ops::elementwise::binary_scalar(x, *scalar, *op, *left)
            }
            OpKind::Where => x.where_cond(inputs[1], inputs[2]),
            OpKind::Reduce {
                op,
                axes,
                keepdim,
                correction,
            } => crate::ops::reduce::reduce(x, *op, axes, *keepdim, *correction),
            OpKind::Softmax { axis, log } => {
                if *log {
                    x.log_softmax(*axis)
                } else {
                    x.softmax(*axis)
                }
            }
            OpKind::Matmul => x.matmul(inputs[1]),
            OpKind::Linear { bias, act } => {
                crate::ops::matmul::linear(x, inputs[1], opt(*bias, 2), *act, Variant::F32)
            }
            OpKind::Conv2d { opts, bias, act } => crate::ops::conv::conv2d_fused(
                x,
                inputs[1],
                opt(*bias, 2),
                opts,
                *act,
                Variant::F32,
            ),
            OpKind::ConvTranspose2d { opts, bias } => {
                x.conv_transpose2d(inputs[1], opt(*bias, 2), opts)
            }
            OpKind::Pool { opts, max } => {
                if *max {
                    x.max_pool2d(opts)
                } else {
                    x.avg_pool2d(opts)
                }
            }
            OpKind::AdaptiveAvgPool { size } => x.adaptive_avg_pool2d(*size),
            OpKind::BatchNorm { eps, weight, bias } => x.batch_norm(
                Some(inputs[1]),
                Some(inputs[2]),
                opt(*weight, 3),
                opt(*bias, 3 + *weight as usize),
                false,
                0.0,
                *eps,
            ),
            OpKind::LayerNorm {
                shape,
                eps,
                weight,
                bias,
            } => x.layer_norm(
                shape,
                opt(*weight, 1),
                opt(*bias, 1 + *weight as usize),
                *eps,
            ),
            OpKind::GroupNorm {
                groups,
                eps,
                weight,
                bias,
            } => x.group_norm(
                *groups,
                opt(*weight, 1),
                opt(*bias, 1 + *weight as usize),
                *eps,
            ),
            OpKind::Concat { axis } => Tensor::concat(inputs, *axis),
            OpKind::IndexSelect { axis } => x.index_select(*axis, inputs[1]),
            OpKind::Gather { axis } => x.gather(*axis, inputs[1]),
            OpKind::Full { .. } => unreachable!("handled above"),
            OpKind::Cast { .. } => x.contiguous(),
            OpKind::QuantizeRows { scale, zero_point } => {
                let k = *x.dims().last().unwrap_or(&0);
                let q = crate::quant::QParams {
                    scale: *scale,
                    zero_point: *zero_point,
                };
                let w = crate::ops::quant::quantize_rows(x, k, q)?;
                let rows = x.numel() / k.max(1);
                Ok(w.with_layout(crate::shape::Layout::contiguous(&[
                    rows,
                    crate::ops::quant::padded_words(k),
                ])))
            }
            OpKind::QuantizeIm2col {
                scale,
                zero_point,
                kernel,
                opts,
            } => {
                let c = x.dims().get(1).copied().unwrap_or(0);
                let g = crate::ops::conv::conv2d_geometry(
                    x.dims(),
                    &[1, c, kernel[0], kernel[1]],
                    &Conv2dOptions { groups: 1, ..*opts },
                )?;
                let q = crate::quant::QParams {
                    scale: *scale,
                    zero_point: *zero_point,
                };
                let w = crate::ops::quant::quantize_im2col(x, &g, q)?;
                Ok(w.with_layout(crate::shape::Layout::contiguous(&[
                    g.n * g.oh * g.ow,
                    crate::ops::quant::padded_words(c * kernel[0] * kernel[1]),
                ])))
            }
            OpKind::QuantizeDynamic => {
                let k = *x.dims().last().unwrap_or(&0);
                crate::ops::quant::quantize_rows_dynamic(x, k)
            }
            OpKind::QuantizeNhwc { scale, zero_point } => {
                let q = crate::quant::QParams {
                    scale: *scale,
                    zero_point: *zero_point,
                };
                let w = crate::ops::quant::quantize_nhwc(x, q)?;
                let d = x.dims();
                Ok(w.with_layout(crate::shape::Layout::contiguous(&[
                    d[0] * d[2] * d[3],
                    crate::ops::quant::padded_words(d[1]),
                ])))
            }
            OpKind::QGemm {
                n: ch,
                act,
                spatial,
                dynamic,
                window,
                int8_out,
            } => {
                use crate::ops::quant::{qgemm, QOut, QShape};
                let k4 = inputs[1].dims()[1] / window.map_or(1, |w| w.kernel[0] * w.kernel[1]);
                // Rows: output positions (windowed or patch rows), or the rows of x.
                let m = match (dynamic, window, spatial) {
                    (true, ..) => (x.numel() - 4) / k4.max(1),
                    (false, Some(w), Some([oh, ow])) => {
                        x.dims()[0] / (w.grid[0] * w.grid[1]).max(1) * oh * ow
                    }
                    _ => x.dims()[0],
                };
                let out = match (int8_out, dynamic) {
                    (Some(zy), _) => QOut::I8 {
                        zy: *zy,
                        relu: act.is_some(),
                    },
                    (None, true) => QOut::Dynamic { act: *act },
                    (None, false) => QOut::F32 { act: *act },
                };
                // f32 results of a convolution are NCHW; int8 ones stay rows.
                let nchw = spatial.filter(|_| int8_out.is_none());
                let s = QShape {
                    m,
                    n: *ch,
                    k4,
                    ohw: nchw.map_or(0, |[oh, ow]| oh * ow),
                    window: *window,
                };
                let y = qgemm(x, inputs[1], inputs[2], &s, out, false)?;
                let dims = match (int8_out, nchw) {
                    (Some(_), _) => vec![m, crate::ops::quant::padded_words(*ch)],
                    (None, Some([oh, ow])) => vec![m / (oh * ow), *ch, oh, ow],
                    (None, None) => return Ok(y),
                };
                Ok(y.with_layout(crate::shape::Layout::contiguous(&dims)))
            }
        }
    }

    /// Runs the op on half-precision operands (only where [`OpKind::has_half_kernel`]).
    pub(crate) fn apply_half(&self, inputs: &[&Tensor], out_shape: &[usize]) -> Result<Tensor> {
        let x = inputs[0];
        let dev = x.device();
        let f16_out = || half_uninit(out_shape, dev);
        match self {
            OpKind::Linear { bias, act } => crate::ops::matmul::linear(
                x,
                inputs[1],
                bias.then(|| inputs[2]),
                *act,
                Variant::F16,
            ),
            OpKind::Conv2d { opts, bias, act } => crate::ops::conv::conv2d_fused(
                x,
                inputs[1],
                bias.then(|| inputs[2]),
                opts,
                *act,
                Variant::F16,
            ),
            OpKind::Pool { .. } | OpKind::AdaptiveAvgPool { .. } => {
                let out = f16_out()?;
                // An unbatched (C, H, W) input runs as a batch of one.
                let batched;
                let x = if x.rank() == 3 {
                    batched = x.with_layout(crate::shape::Layout::contiguous(&[
                        1,
                        x.dims()[0],
                        x.dims()[1],
                        x.dims()[2],
                    ]));
                    &batched
                } else {
                    x
                };
                let g = match self {
                    OpKind::Pool { opts, max } => {
                        let mode = if *max {
                            crate::ops::pool::MODE_MAX
                        } else if opts.count_include_pad {
                            crate::ops::pool::MODE_AVG_WITH_PAD
                        } else {
                            crate::ops::pool::MODE_AVG_VALID
                        };
                        crate::ops::pool::geometry("pool2d", x.dims(), opts, mode)?
                    }
                    OpKind::AdaptiveAvgPool { size } => {
                        crate::ops::pool::adaptive_geometry(x.dims(), *size)?
                    }
                    _ => unreachable!("matched above"),
                };
                crate::ops::pool::pool_into(x, &out, &g, Variant::F16)?;
                Ok(out)
            }
            OpKind::Reshape { .. } => {
                Ok(x.with_layout(crate::shape::Layout::contiguous(out_shape)))
            }
            OpKind::Unary { op, alpha, beta } => {
                let out = f16_out()?;
                let e = crate::ops::elementwise::Extra {
                    op: *op as u32,
                    alpha: *alpha,
                    beta: *beta,
                    ..Default::default()
                };
                crate::ops::elementwise::launch_variant(
                    crate::kernels::Kernel::UnaryFwd,
                    Variant::F16,
                    &[(x, &x.layout)],
                    &out,
                    &out.layout.clone(),
                    e,
                )?;
                Ok(out)
            }
            OpKind::Cast { to } => cast(x, *to),
            _ => Err(Error::invalid(self.name(), "has no half-precision kernel")),
        }
    }
}

/// A contiguous tensor of `shape` whose storage holds f16 values (two per 4-byte word).
pub(crate) fn half_uninit(shape: &[usize], device: &crate::Device) -> Result<Tensor> {
    let n = checked_numel(shape).unwrap_or(usize::MAX);
    let words = n.div_ceil(2).max(1);
    Ok(
        Tensor::alloc_typed("to_half", &[words], DType::F16, device, false)?
            .with_layout(crate::shape::Layout::contiguous(shape)),
    )
}

/// `x` converted to `to` (f16 storage from f32 or back).
pub(crate) fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    let (out, variant) = match to {
        DType::F16 => (half_uninit(x.dims(), x.device())?, Variant::F32ToF16),
        _ => (
            Tensor::uninit("cast", x.dims(), x.device())?,
            Variant::F16ToF32,
        ),
    };
    let src = if to == DType::F16 {
        x.contiguous()?
    } else {
        x.clone()
    };
    crate::ops::elementwise::launch_variant(
        crate::kernels::Kernel::UnaryFwd,
        variant,
        &[(&src, &src.layout)],
        &out,
        &out.layout.clone(),
        crate::ops::elementwise::Extra::default(),
    )?;
    Ok(out)
}

/// One node: an op, its operands, and its output's shape and element type.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub op: OpKind,
    pub inputs: Vec<Src>,
    pub shape: Vec<Dim>,
    pub dtype: DType,
}

/// A model input: its shape, with the batch axis as `N`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct InputSpec {
    pub shape: Vec<Dim>,
}

/// A captured forward pass.
#[derive(Clone)]
pub(crate) struct Graph {
    pub inputs: Vec<InputSpec>,
    pub consts: Vec<Tensor>,
    /// Element type of each constant's storage.
    pub const_dtypes: Vec<DType>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<Src>,
}

impl Graph {
    /// The shape of `src` at batch `n`, given the node shapes computed so far.
    pub(crate) fn src_shape<'a>(
        &'a self,
        src: Src,
        node_shapes: &'a [Vec<usize>],
        input_shapes: &'a [Vec<usize>],
    ) -> &'a [usize] {
        match src {
            Src::Input(k) => &input_shapes[k],
            Src::Const(k) => self.consts[k].dims(),
            Src::Node(k) => &node_shapes[k],
        }
    }

    /// Number of nodes reading each node's output (graph outputs count as readers).
    pub(crate) fn users(&self) -> Vec<usize> {
        let mut users = vec![0; self.nodes.len()];
        for src in self
            .nodes
            .iter()
            .flat_map(|n| &n.inputs)
            .chain(&self.outputs)
        {
            if let Src::Node(k) = src {
                users[*k] += 1;
            }
        }
        users
    }

    /// Every node's output shape at the given input shapes and batch size, checking each op
    /// and that the result matches the shape recorded in the node.
    pub(crate) fn infer_shapes(
        &self,
        input_shapes: &[Vec<usize>],
        n: usize,
    ) -> Result<Vec<Vec<usize>>> {
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let ins: Vec<&[usize]> = node
                .inputs
                .iter()
                .map(|&s| self.src_shape(s, &shapes, input_shapes))
                .collect();
            let s = node
                .op
                .output_shape(&ins, n)
                .map_err(|e| Error::shape("InferenceModel", format!("node {i}: {e}")))?;
            let recorded = dims_at(&node.shape, n)?;
            if s != recorded {
                return Err(Error::shape(
                    "InferenceModel",
                    format!(
                        "node {i} ({}) gives {s:?} for inputs {ins:?}, the graph says {recorded:?}",
                        node.op.name()
                    ),
                ));
            }
            shapes.push(s);
        }
        Ok(shapes)
    }

    /// A readable listing, one node a line.
    pub(crate) fn describe(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            s.push_str(&format!(
                "%{i} = {}{:?} {:?} -> {}\n",
                n.op.name(),
                n.inputs,
                n.op,
                n.dtype.name()
            ));
        }
        s.push_str(&format!("outputs {:?}\n", self.outputs));
        s
    }
}

/// A reshape to `out`'s shape (reshape, squeeze, unsqueeze and flatten alike).
pub(crate) fn reshape_node(out: &Tensor) -> OpKind {
    OpKind::Reshape {
        shape: out.dims().iter().map(|&d| Dim::fixed(d)).collect(),
    }
}

/// An expand to `out`'s shape.
pub(crate) fn expand_node(out: &Tensor) -> OpKind {
    OpKind::Expand {
        shape: out.dims().iter().map(|&d| Dim::fixed(d)).collect(),
    }
}

fn axis_of(a: isize, rank: usize) -> usize {
    if a < 0 {
        (a + rank as isize).max(0) as usize
    } else {
        a as usize
    }
}

/// A permutation as the tensor op normalises it.
pub(crate) fn permute_node(perm: &[isize], rank: usize) -> OpKind {
    OpKind::Permute {
        perm: perm.iter().map(|&a| axis_of(a, rank)).collect(),
    }
}

/// The permutation that swaps axes `a` and `b`.
pub(crate) fn transpose_node(a: isize, b: isize, rank: usize) -> OpKind {
    let mut perm: Vec<usize> = (0..rank).collect();
    perm.swap(
        axis_of(a, rank).min(rank.saturating_sub(1)),
        axis_of(b, rank).min(rank.saturating_sub(1)),
    );
    OpKind::Permute { perm }
}

/// `len` elements of `axis` from `start`.
pub(crate) fn narrow_node(axis: isize, start: usize, len: usize, rank: usize) -> OpKind {
    OpKind::Narrow {
        axis: axis_of(axis, rank),
        start: Dim::fixed(start),
        len: Dim::fixed(len),
    }
}
