//! Elementwise operations: unary maths, binary maths with broadcasting, scalar variants,
//! comparisons, `where`, `clamp`, and the strided copy behind `contiguous`.

use bytemuck::{Pod, Zeroable};

use super::{grid, pack};
use crate::autograd::{record, Op};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, Variant};
use crate::shape::{broadcast_shapes, Layout, MAX_RANK};
use crate::tensor::Tensor;

/// Uniform parameters of `shaders/elementwise.wgsl` (its `Params` struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ElementwiseParams {
    pub n: u32,
    pub rank: u32,
    pub op: u32,
    pub flags: u32,
    pub off_a: u32,
    pub off_b: u32,
    pub off_c: u32,
    pub off_o: u32,
    pub alpha: f32,
    pub beta: f32,
    pub aux0: u32,
    pub aux1: u32,
    pub shape: [u32; MAX_RANK],
    pub sa: [u32; MAX_RANK],
    pub sb: [u32; MAX_RANK],
    pub sc: [u32; MAX_RANK],
    pub so: [u32; MAX_RANK],
}

pub(crate) const FLAG_SCALAR_LEFT: u32 = 16;

/// Unary operations of `unary_fwd`; the discriminant is the shader's op code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum UnaryOp {
    /// x (a copy)
    Identity = 0,
    /// -x
    Neg = 1,
    /// |x|
    Abs = 2,
    /// e^x
    Exp = 3,
    /// ln x (NaN below 0, -inf at 0)
    Log = 4,
    /// sqrt x (NaN below 0)
    Sqrt = 5,
    /// 1 / sqrt x
    Rsqrt = 6,
    /// max(x, 0)
    Relu = 7,
    /// x >= 0 ? x : slope * x
    LeakyRelu = 8,
    /// 1 / (1 + e^-x), computed without overflow
    Sigmoid = 9,
    /// tanh x
    Tanh = 10,
    /// x * Phi(x), the exact (erf) form that is PyTorch's default
    Gelu = 11,
    /// x * sigmoid(x)
    Silu = 12,
    /// min(max(x, lo), hi)
    Clamp = 13,
    /// ln(1 + x), accurate for small x
    Log1p = 14,
    /// ln(1 + e^(beta x)) / beta, or x where beta x > threshold (`torch.nn.functional.softplus`)
    Softplus = 15,
    /// sin x
    Sin = 16,
    /// cos x
    Cos = 17,
    /// GELU, tanh approximation (`approximate='tanh'`)
    GeluTanh = 18,
    /// erf x, the Gauss error function
    Erf = 19,
    /// x rounded toward zero (zero gradient)
    Trunc = 20,
}

/// Binary operations of `binary_fwd`; the discriminant is the shader's op code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum BinaryOp {
    /// x + y
    Add = 0,
    /// x - y
    Sub = 1,
    /// x * y
    Mul = 2,
    /// x / y
    Div = 3,
    /// x ^ y (NaN for a negative base with a fractional exponent)
    Pow = 4,
    /// max(x, y), NaN if either is NaN
    Maximum = 5,
    /// min(x, y), NaN if either is NaN
    Minimum = 6,
    /// 1 where x == y, else 0
    Eq = 7,
    /// 1 where x != y, else 0
    Ne = 8,
    /// 1 where x < y, else 0
    Lt = 9,
    /// 1 where x <= y, else 0
    Le = 10,
    /// 1 where x > y, else 0
    Gt = 11,
    /// 1 where x >= y, else 0
    Ge = 12,
}

impl BinaryOp {
    fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::Eq => "eq",
            BinaryOp::Ne => "ne",
            BinaryOp::Lt => "lt",
            BinaryOp::Le => "le",
            BinaryOp::Gt => "gt",
            BinaryOp::Ge => "ge",
        }
    }
}

/// `flags` bit of a contiguous output (bits 0-2: inputs a, b, c; see `shaders/elementwise.wgsl`).
const FLAG_O_CONTIG: u32 = 8;
/// Operand `i`'s innermost stride is 0 in the strided4 kernels: `FLAG_A_SPLAT << i`.
const FLAG_A_SPLAT: u32 = 32;
/// Every index is below 2^22: the kernels divide in f32 (`split_index`).
const FLAG_SMALL_INDEX: u32 = 128;

/// Scalar arguments and extra words of one elementwise dispatch.
#[derive(Clone, Copy, Default)]
pub(crate) struct Extra {
    pub op: u32,
    pub alpha: f32,
    pub beta: f32,
    pub aux: [u32; 2],
    pub flags: u32,
    /// Goes to `off_c` when there is no third input (`gather_bwd` reads a stride from it).
    pub aux2: u32,
}

/// The same positions with fewer axes: size-1 axes dropped, and each axis merged into the
/// next inner one where every layout steps through the two as through one (`stride[d] ==
/// stride[d + 1] * shape[d + 1]`). `inputs` have `out`'s shape.
fn merge_axes(out: &Layout, inputs: &[&Layout]) -> (Layout, Vec<Layout>) {
    let all: Vec<&Layout> = std::iter::once(out).chain(inputs.iter().copied()).collect();
    let mut shape: Vec<usize> = Vec::new();
    let mut strides: Vec<Vec<usize>> = vec![Vec::new(); all.len()];
    for d in (0..out.rank()).rev() {
        let size = out.shape[d];
        if size == 1 {
            continue;
        }
        let inner = shape.len().checked_sub(1);
        let merges = inner.is_some_and(|g| {
            all.iter()
                .zip(&strides)
                .all(|(l, s)| l.strides[d] == s[g] * shape[g])
        });
        match inner {
            Some(g) if merges => shape[g] *= size,
            _ => {
                shape.push(size);
                for (s, l) in strides.iter_mut().zip(&all) {
                    s.push(l.strides[d]);
                }
            }
        }
    }
    if shape.is_empty() {
        shape.push(1);
        for s in &mut strides {
            s.push(1);
        }
    }
    shape.reverse();
    let mut layouts = all.iter().zip(strides).map(|(l, mut s)| {
        s.reverse();
        Layout {
            shape: shape.clone(),
            strides: s,
            offset: l.offset,
        }
    });
    let out = layouts.next().unwrap_or_else(|| Layout::contiguous(&shape));
    (out, layouts.collect())
}

/// Records one elementwise dispatch: `inputs` are read through their layouts (already
/// broadcast to `out_layout.shape`), the result is written through `out_layout` into `out`.
pub(crate) fn launch(
    kernel: Kernel,
    inputs: &[(&Tensor, &Layout)],
    out: &Tensor,
    out_layout: &Layout,
    extra: Extra,
) {
    // The f32 variant of every kernel exists on every device.
    let _ = launch_variant(kernel, Variant::F32, inputs, out, out_layout, extra);
}

/// [`launch`] of an element-type variant (for half-precision inference).
pub(crate) fn launch_variant(
    kernel: Kernel,
    variant: Variant,
    inputs: &[(&Tensor, &Layout)],
    out: &Tensor,
    out_layout: &Layout,
    extra: Extra,
) -> Result<()> {
    let n = out_layout.numel();
    if n == 0 {
        return Ok(());
    }
    // Kernels that see positions only: merge the axes that every operand steps through alike
    // (fewer divisions per element, and runs long enough for vec4s).
    let positional = matches!(
        kernel,
        Kernel::UnaryFwd
            | Kernel::BinaryFwd
            | Kernel::BinaryScalarFwd
            | Kernel::UnaryBwd
            | Kernel::WhereFwd
    );
    let merged;
    let merged_inputs: Vec<(&Tensor, &Layout)>;
    let (out_layout, inputs) = if positional {
        let ins: Vec<&Layout> = inputs.iter().map(|(_, l)| *l).collect();
        merged = merge_axes(out_layout, &ins);
        merged_inputs = inputs
            .iter()
            .zip(&merged.1)
            .map(|((t, _), l)| (*t, l))
            .collect();
        (&merged.0, &merged_inputs[..])
    } else {
        (out_layout, inputs)
    };
    let mut p = ElementwiseParams {
        n: n as u32,
        rank: out_layout.rank() as u32,
        op: extra.op,
        flags: extra.flags,
        off_o: out_layout.offset as u32,
        alpha: extra.alpha,
        beta: extra.beta,
        aux0: extra.aux[0],
        aux1: extra.aux[1],
        off_c: extra.aux2,
        shape: pack(out_layout.shape.iter().copied()),
        so: pack(out_layout.strides.iter().copied()),
        ..Zeroable::zeroed()
    };
    if out_layout.is_contiguous() {
        p.flags |= FLAG_O_CONTIG;
    }
    if n < 1 << 22 {
        p.flags |= FLAG_SMALL_INDEX;
    }
    for (i, (_, l)) in inputs.iter().enumerate() {
        let strides = pack(l.strides.iter().copied());
        let contiguous = l.is_contiguous() && l.shape == out_layout.shape;
        if contiguous {
            p.flags |= 1 << i;
        }
        match i {
            0 => (p.off_a, p.sa) = (l.offset as u32, strides),
            1 => (p.off_b, p.sb) = (l.offset as u32, strides),
            _ => (p.off_c, p.sc) = (l.offset as u32, strides),
        }
    }
    // Every operand contiguous and in whole vec4s: the vec4 variant, where there is one.
    let contiguous = ((1 << inputs.len()) - 1) | FLAG_O_CONTIG;
    let aligned = p.flags & contiguous == contiguous
        && n.is_multiple_of(4)
        && p.off_o.is_multiple_of(4)
        && inputs.iter().all(|(_, l)| l.offset.is_multiple_of(4));
    // Otherwise, four elements at a time where every operand's innermost axis is contiguous
    // (read as vec4s) or broadcast (one element), with 4-aligned other strides and offsets.
    let r = out_layout.rank();
    let aligned4 = |l: &Layout| {
        l.offset.is_multiple_of(4) && l.strides[..r - 1].iter().all(|s| s.is_multiple_of(4))
    };
    let strided4 = super::tune::elementwise_has_strided4(kernel)
        && !aligned
        && out_layout.shape[r - 1].is_multiple_of(4)
        && out_layout.strides[r - 1] == 1
        && aligned4(out_layout)
        && inputs.iter().all(|(_, l)| match l.strides[r - 1] {
            0 => true,
            1 => aligned4(l),
            _ => false,
        });
    if strided4 {
        for (i, (_, l)) in inputs.iter().enumerate() {
            if l.strides[r - 1] == 0 {
                p.flags |= FLAG_A_SPLAT << i;
            }
        }
    }
    let layout = match () {
        _ if strided4 => super::tune::ElementwiseLayout::Strided4,
        _ if aligned => super::tune::ElementwiseLayout::Vec4,
        _ => super::tune::ElementwiseLayout::Any,
    };
    let kernel = super::tune::elementwise(kernel, layout);
    let buffers: Vec<&wgpu::Buffer> = inputs.iter().map(|(t, _)| t.buffer()).collect();
    // Gathers report bad indices in the device's fault words.
    let fault = out.device().fault_buffer();
    let outputs: &[&wgpu::Buffer] = if kernel == Kernel::GatherFwd {
        &[out.buffer(), fault]
    } else {
        &[out.buffer()]
    };
    out.device().dispatch_variant(
        kernel,
        variant,
        &buffers,
        outputs,
        bytemuck::bytes_of(&p),
        grid(n.div_ceil(kernel.per_invocation()), 256),
    )
}

/// `out = op(out)` in place, for a contiguous `out` from offset 0 whose size is a multiple of
/// 4: the activation after a kernel that has no fused one. `variant` is the producing kernel's
/// (the pass reads and writes its output type).
pub(crate) fn activation_in_place(
    out: &Tensor,
    op: UnaryOp,
    alpha: f32,
    variant: Variant,
) -> Result<()> {
    let variant = match variant {
        Variant::F16 | Variant::F32ToF16 => Variant::F16,
        // Producing kernels write f32 in the other variants.
        _ => Variant::F32,
    };
    let extra = Extra {
        op: op as u32,
        alpha,
        ..Default::default()
    };
    launch_variant(
        Kernel::UnaryInplaceVec4Fwd,
        variant,
        &[],
        out,
        &out.layout,
        extra,
    )
}

fn check_rank(op: &'static str, shape: &[usize]) -> Result<()> {
    if shape.len() > MAX_RANK {
        return Err(Error::shape(
            op,
            format!("rank {} exceeds {MAX_RANK} (shape {shape:?})", shape.len()),
        ));
    }
    Ok(())
}

impl UnaryOp {
    /// True when the derivative is computed from the output y rather than the input x.
    pub(crate) fn grad_uses_output(self) -> bool {
        matches!(
            self,
            UnaryOp::Exp | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Sigmoid | UnaryOp::Tanh
        )
    }
}

impl BinaryOp {
    fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
        )
    }
}

fn unary_raw(x: &Tensor, op: UnaryOp, alpha: f32, beta: f32) -> Result<Tensor> {
    let out = Tensor::uninit("unary", x.dims(), x.device())?;
    let extra = Extra {
        op: op as u32,
        alpha,
        beta,
        ..Default::default()
    };
    launch(
        Kernel::UnaryFwd,
        &[(x, &x.layout)],
        &out,
        &out.layout.clone(),
        extra,
    );
    Ok(out)
}

pub(crate) fn unary(x: &Tensor, op: UnaryOp, alpha: f32, beta: f32) -> Result<Tensor> {
    crate::infer::capture::traced(
        &[x],
        |_| crate::infer::graph::OpKind::Unary { op, alpha, beta },
        || {
            let out = unary_raw(x, op, alpha, beta)?;
            Ok(record(out, &[x], |y| Op::Unary {
                op,
                saved: if op.grad_uses_output() {
                    y.clone()
                } else {
                    x.detach()
                },
                alpha,
                beta,
            }))
        },
    )
}

/// `g * f'(saved)` for the unary op `op`, in one dispatch (`unary_bwd`).
pub(crate) fn unary_backward(
    saved: &Tensor,
    g: &Tensor,
    op: UnaryOp,
    alpha: f32,
    beta: f32,
) -> Result<Tensor> {
    let out = Tensor::uninit("unary_backward", g.dims(), g.device())?;
    let extra = Extra {
        op: op as u32,
        alpha,
        beta,
        ..Default::default()
    };
    launch(
        Kernel::UnaryBwd,
        &[(saved, &saved.layout), (g, &g.layout)],
        &out,
        &out.layout.clone(),
        extra,
    );
    Ok(out)
}

/// A contiguous copy of `x`.
pub(crate) fn copy(x: &Tensor) -> Result<Tensor> {
    let out = unary_raw(x, UnaryOp::Identity, 0.0, 0.0)?;
    Ok(record(out, &[x], |_| Op::Copy))
}

/// Copies `src` (broadcast to `dst_layout.shape`) into `dst` through `dst_layout`. Not recorded.
pub(crate) fn copy_into(src: &Tensor, dst: &Tensor, dst_layout: &Layout) -> Result<()> {
    let l = src.layout.broadcast_to("copy", &dst_layout.shape)?;
    launch(
        Kernel::UnaryFwd,
        &[(src, &l)],
        dst,
        dst_layout,
        Extra::default(),
    );
    Ok(())
}

pub(crate) fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    crate::infer::capture::traced(
        &[a, b],
        |_| crate::infer::graph::OpKind::Binary { op },
        || {
            let name = op.name();
            a.check_device(name, b)?;
            let shape = broadcast_shapes(name, a.dims(), b.dims())?;
            check_rank(name, &shape)?;
            let la = a.layout.broadcast_to(name, &shape)?;
            let lb = b.layout.broadcast_to(name, &shape)?;
            let out = Tensor::uninit(name, &shape, a.device())?;
            let extra = Extra {
                op: op as u32,
                ..Default::default()
            };
            launch(
                Kernel::BinaryFwd,
                &[(a, &la), (b, &lb)],
                &out,
                &out.layout.clone(),
                extra,
            );
            if op.is_comparison() {
                return Ok(out);
            }
            let (a_grad, b_grad) = (a.requires_grad_flag(), b.requires_grad_flag());
            Ok(record(out, &[a, b], |y| {
                // Save only what the rule reads for the inputs that need a gradient.
                let (save_a, save_b, save_out) = match op {
                    BinaryOp::Mul => (b_grad, a_grad, false),
                    BinaryOp::Div => (false, true, b_grad),
                    BinaryOp::Pow => (true, true, b_grad),
                    BinaryOp::Maximum | BinaryOp::Minimum => (true, true, false),
                    _ => (false, false, false),
                };
                Op::Binary {
                    op,
                    a: save_a.then(|| a.detach()),
                    b: save_b.then(|| b.detach()),
                    out: save_out.then(|| y.clone()),
                    a_shape: a.shape(),
                    b_shape: b.shape(),
                }
            }))
        },
    )
}

pub(crate) fn binary_scalar(a: &Tensor, s: f32, op: BinaryOp, scalar_left: bool) -> Result<Tensor> {
    crate::infer::capture::traced(
        &[a],
        |_| crate::infer::graph::OpKind::BinaryScalar {
            op,
            scalar: s,
            left: scalar_left,
        },
        || {
            let out = Tensor::uninit(op.name(), a.dims(), a.device())?;
            let extra = Extra {
                op: op as u32,
                alpha: s,
                flags: if scalar_left { FLAG_SCALAR_LEFT } else { 0 },
                ..Default::default()
            };
            launch(
                Kernel::BinaryScalarFwd,
                &[(a, &a.layout)],
                &out,
                &out.layout.clone(),
                extra,
            );
            if op.is_comparison() {
                return Ok(out);
            }
            Ok(record(out, &[a], |y| {
                let (save_x, save_out) = match (op, scalar_left) {
                    (BinaryOp::Div, true) => (true, true),
                    (BinaryOp::Pow, false) | (BinaryOp::Maximum, _) | (BinaryOp::Minimum, _) => {
                        (true, false)
                    }
                    (BinaryOp::Pow, true) => (false, true),
                    _ => (false, false),
                };
                Op::BinaryScalar {
                    op,
                    s,
                    scalar_left,
                    x: save_x.then(|| a.detach()),
                    out: save_out.then(|| y.clone()),
                }
            }))
        },
    )
}

pub(crate) fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    crate::infer::capture::traced(
        &[cond, a, b],
        |_| crate::infer::graph::OpKind::Where,
        || {
            const OP: &str = "where";
            cond.check_device(OP, a)?;
            cond.check_device(OP, b)?;
            let shape =
                broadcast_shapes(OP, &broadcast_shapes(OP, cond.dims(), a.dims())?, b.dims())?;
            check_rank(OP, &shape)?;
            let lc = cond.layout.broadcast_to(OP, &shape)?;
            let la = a.layout.broadcast_to(OP, &shape)?;
            let lb = b.layout.broadcast_to(OP, &shape)?;
            let out = Tensor::uninit(OP, &shape, a.device())?;
            launch(
                Kernel::WhereFwd,
                &[(cond, &lc), (a, &la), (b, &lb)],
                &out,
                &out.layout.clone(),
                Extra::default(),
            );
            Ok(record(out, &[a, b], |_| Op::Where {
                cond: cond.detach(),
                a_shape: a.shape(),
                b_shape: b.shape(),
            }))
        },
    )
}

macro_rules! unary_methods {
    ($($(#[$doc:meta])* $name:ident => $op:ident),* $(,)?) => {
        impl Tensor {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> Result<Tensor> {
                    unary(self, UnaryOp::$op, 0.0, 0.0)
                }
            )*
        }
    };
}

unary_methods! {
    /// -x, elementwise.
    neg => Neg,
    /// |x|, elementwise.
    abs => Abs,
    /// e^x, elementwise.
    exp => Exp,
    /// Natural logarithm, elementwise (NaN below 0, -inf at 0).
    log => Log,
    /// Square root, elementwise (NaN below 0).
    sqrt => Sqrt,
    /// 1 / sqrt(x), elementwise.
    rsqrt => Rsqrt,
    /// max(x, 0), elementwise.
    relu => Relu,
    /// Logistic sigmoid, elementwise, stable for large |x|.
    sigmoid => Sigmoid,
    /// Hyperbolic tangent, elementwise.
    tanh => Tanh,
    /// GELU, exact erf form (PyTorch's default `approximate='none'`), elementwise.
    gelu => Gelu,
    /// SiLU (swish): x * sigmoid(x), elementwise.
    silu => Silu,
    /// ln(1 + x), elementwise, accurate near 0 (NaN below -1, -inf at -1).
    log1p => Log1p,
    /// Sine, elementwise.
    sin => Sin,
    /// Cosine, elementwise.
    cos => Cos,
    /// GELU, tanh approximation (PyTorch's `approximate='tanh'`), elementwise:
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    gelu_tanh => GeluTanh,
    /// The Gauss error function erf(x), elementwise (`torch.erf`).
    erf => Erf,
    /// x rounded toward zero, elementwise (`torch.trunc`); its gradient is zero.
    trunc => Trunc,
}

impl Tensor {
    /// ln(1 + e^(beta x)) / beta, elementwise, and x itself where beta x > threshold, as
    /// `torch.nn.functional.softplus(x, beta, threshold)` (PyTorch's defaults are 1 and 20).
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::from_slice(&[0.0, 30.0], &[2], &dev)?;
    /// let y = t.softplus(1.0, 20.0)?.to_vec()?;
    /// assert!((y[0] - 2f32.ln()).abs() < 1e-6 && y[1] == 30.0);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn softplus(&self, beta: f32, threshold: f32) -> Result<Tensor> {
        if !(beta.is_finite() && beta != 0.0) || threshold.is_nan() {
            return Err(Error::invalid(
                "softplus",
                format!("beta must be finite and non-zero and threshold a number, got beta {beta}, threshold {threshold}"),
            ));
        }
        unary(self, UnaryOp::Softplus, beta, threshold)
    }
}

macro_rules! binary_methods {
    ($($(#[$doc:meta])* $name:ident, $scalar:ident => $op:ident),* $(,)?) => {
        impl Tensor {
            $(
                $(#[$doc])*
                ///
                /// Shapes broadcast as in NumPy.
                pub fn $name(&self, other: &Tensor) -> Result<Tensor> {
                    binary(self, other, BinaryOp::$op)
                }

                $(#[$doc])*
                ///
                /// The other operand is a scalar.
                pub fn $scalar(&self, s: f32) -> Result<Tensor> {
                    binary_scalar(self, s, BinaryOp::$op, false)
                }
            )*
        }
    };
}

binary_methods! {
    /// self + other, elementwise.
    add, add_scalar => Add,
    /// self - other, elementwise.
    sub, sub_scalar => Sub,
    /// self * other, elementwise.
    mul, mul_scalar => Mul,
    /// self / other, elementwise.
    div, div_scalar => Div,
    /// self ^ other, elementwise.
    pow, pow_scalar => Pow,
    /// Larger of the two, elementwise (NaN if either is NaN).
    maximum, maximum_scalar => Maximum,
    /// Smaller of the two, elementwise (NaN if either is NaN).
    minimum, minimum_scalar => Minimum,
    /// 1.0 where equal, else 0.0.
    eq, eq_scalar => Eq,
    /// 1.0 where not equal, else 0.0.
    ne, ne_scalar => Ne,
    /// 1.0 where self < other, else 0.0.
    lt, lt_scalar => Lt,
    /// 1.0 where self <= other, else 0.0.
    le, le_scalar => Le,
    /// 1.0 where self > other, else 0.0.
    gt, gt_scalar => Gt,
    /// 1.0 where self >= other, else 0.0.
    ge, ge_scalar => Ge,
}

impl Tensor {
    /// x >= 0 ? x : slope * x, elementwise (PyTorch's default slope is 0.01).
    pub fn leaky_relu(&self, slope: f32) -> Result<Tensor> {
        unary(self, UnaryOp::LeakyRelu, slope, 0.0)
    }

    /// x ^ exponent, elementwise (same as [`Tensor::pow_scalar`]).
    pub fn powf(&self, exponent: f32) -> Result<Tensor> {
        self.pow_scalar(exponent)
    }

    /// Values limited to `[min, max]`; NaN stays NaN.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::from_slice(&[-2.0, 0.5, 3.0], &[3], &dev)?;
    /// assert_eq!(t.clamp(-1.0, 1.0)?.to_vec()?, vec![-1.0, 0.5, 1.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn clamp(&self, min: f32, max: f32) -> Result<Tensor> {
        if min > max || min.is_nan() || max.is_nan() {
            return Err(Error::invalid(
                "clamp",
                format!("min {min} must not exceed max {max}"),
            ));
        }
        unary(self, UnaryOp::Clamp, min, max)
    }

    /// s - self, elementwise.
    pub fn rsub_scalar(&self, s: f32) -> Result<Tensor> {
        binary_scalar(self, s, BinaryOp::Sub, true)
    }

    /// s / self, elementwise.
    pub fn rdiv_scalar(&self, s: f32) -> Result<Tensor> {
        binary_scalar(self, s, BinaryOp::Div, true)
    }

    /// self * self, elementwise.
    pub fn square(&self) -> Result<Tensor> {
        binary(self, self, BinaryOp::Mul)
    }

    /// Elements of `a` where `self` is non-zero, of `b` elsewhere (all three broadcast).
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let c = kiln::Tensor::from_slice(&[1.0, 0.0], &[2], &dev)?;
    /// let a = kiln::Tensor::full(&[2], 5.0, &dev)?;
    /// let b = kiln::Tensor::zeros(&[2], &dev)?;
    /// assert_eq!(c.where_cond(&a, &b)?.to_vec()?, vec![5.0, 0.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn where_cond(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        where_cond(self, a, b)
    }
}

/// `a + b`, `a - b`, `a * b`, `a / b` (broadcasting) and `a + 2.0` etc., on tensors and
/// references, each a `Result` as the named methods return: `((&a + &b)? * &c)?`.
///
/// ```
/// # let dev = kiln::Device::default_device()?;
/// let a = kiln::Tensor::from_slice(&[1.0, 2.0], &[2], &dev)?;
/// let b = kiln::Tensor::from_slice(&[3.0, 4.0], &[2], &dev)?;
/// let y = ((&a + &b)? * 2.0)?;
/// assert_eq!(y.to_vec()?, vec![8.0, 12.0]);
/// assert_eq!((-&a)?.to_vec()?, vec![-1.0, -2.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
mod operators {
    use super::*;
    use std::ops::{Add, Div, Mul, Neg, Sub};

    macro_rules! operator {
        ($($trait:ident, $method:ident, $tensor_fn:ident, $scalar_fn:ident);* $(;)?) => {
            $(
                impl $trait<&Tensor> for &Tensor {
                    type Output = Result<Tensor>;
                    fn $method(self, other: &Tensor) -> Result<Tensor> {
                        self.$tensor_fn(other)
                    }
                }

                impl $trait<f32> for &Tensor {
                    type Output = Result<Tensor>;
                    fn $method(self, s: f32) -> Result<Tensor> {
                        self.$scalar_fn(s)
                    }
                }

                impl $trait<Tensor> for &Tensor {
                    type Output = Result<Tensor>;
                    fn $method(self, other: Tensor) -> Result<Tensor> {
                        self.$tensor_fn(&other)
                    }
                }

                impl $trait<&Tensor> for Tensor {
                    type Output = Result<Tensor>;
                    fn $method(self, other: &Tensor) -> Result<Tensor> {
                        Tensor::$tensor_fn(&self, other)
                    }
                }

                impl $trait<Tensor> for Tensor {
                    type Output = Result<Tensor>;
                    fn $method(self, other: Tensor) -> Result<Tensor> {
                        Tensor::$tensor_fn(&self, &other)
                    }
                }

                impl $trait<f32> for Tensor {
                    type Output = Result<Tensor>;
                    fn $method(self, s: f32) -> Result<Tensor> {
                        self.$scalar_fn(s)
                    }
                }
            )*
        };
    }

    operator! {
        Add, add, add, add_scalar;
        Sub, sub, sub, sub_scalar;
        Mul, mul, mul, mul_scalar;
        Div, div, div, div_scalar;
    }

    impl Neg for &Tensor {
        type Output = Result<Tensor>;
        fn neg(self) -> Result<Tensor> {
            Tensor::neg(self)
        }
    }

    impl Neg for Tensor {
        type Output = Result<Tensor>;
        fn neg(self) -> Result<Tensor> {
            Tensor::neg(&self)
        }
    }
}
