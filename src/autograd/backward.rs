//! The calculus: every recorded op and its backward rule, in one place.
//!
//! Each rule receives `g = dL/d(output)` and returns `dL/d(input)` for each input that needs
//! it, written with kiln's own GPU ops (nothing is read back). Inputs that were broadcast get
//! their gradient summed back to their shape with [`sum_to`]. Elementwise derivatives of the
//! activations run in one fused kernel, `unary_bwd` in `shaders/elementwise.wgsl`; its
//! formulas are repeated in the comments below.
//!
//! Ties: `max`/`min` over axes share the gradient equally among tied maxima (as PyTorch's
//! `amax`/`amin`); `maximum`/`minimum` give half to each side on a tie (as PyTorch).

use crate::error::{Error, Result};
use crate::ops::conv::{conv_bwd_input, conv_bwd_weight, conv_fwd, ConvGeometry};
use crate::ops::elementwise::{unary_backward, BinaryOp, UnaryOp};
use crate::ops::index::gather_backward;
use crate::ops::pool::{pool_backward, PoolGeometry};
use crate::ops::reduce::ReduceOp;
use crate::shape::Layout;
use crate::tensor::Tensor;

/// A recorded operation with what its backward rule needs. Saved tensors are detached.
pub(crate) enum Op {
    /// y = f(x) for an activation; `saved` is x or y, whichever the derivative uses
    /// ([`UnaryOp::grad_uses_output`]).
    Unary {
        op: UnaryOp,
        saved: Tensor,
        alpha: f32,
        beta: f32,
    },
    /// y = a (op) b with broadcasting. Operands are saved only when the rule needs them.
    Binary {
        op: BinaryOp,
        a: Option<Tensor>,
        b: Option<Tensor>,
        out: Option<Tensor>,
        a_shape: Vec<usize>,
        b_shape: Vec<usize>,
    },
    /// y = x (op) s, or s (op) x when `scalar_left`.
    BinaryScalar {
        op: BinaryOp,
        s: f32,
        scalar_left: bool,
        x: Option<Tensor>,
        out: Option<Tensor>,
    },
    /// y = cond ? a : b.
    Where {
        cond: Tensor,
        a_shape: Vec<usize>,
        b_shape: Vec<usize>,
    },
    /// y = reduce(x) over `axes` (sorted); `keep_shape` is y's shape with the axes kept as 1.
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keep_shape: Vec<usize>,
        in_shape: Vec<usize>,
        x: Option<Tensor>,
        out: Option<Tensor>,
        correction: f32,
    },
    /// y = softmax(x) along `axis`.
    Softmax { axis: isize, out: Tensor },
    /// y = log_softmax(x) along `axis`.
    LogSoftmax { axis: isize, out: Tensor },
    /// y = a @ b, both of rank >= 2, batch axes broadcast. `a_t`/`b_t`: the operand is a
    /// 2-D transposed view (as `w.t()` in a linear layer), whose gradient is then computed
    /// transposed so that it comes back in the storage order of the tensor it views.
    Matmul {
        a: Option<Tensor>,
        b: Option<Tensor>,
        a_shape: Vec<usize>,
        b_shape: Vec<usize>,
        a_t: bool,
        b_t: bool,
    },
    /// A view or copy with the same elements in another shape.
    Reshape { in_shape: Vec<usize> },
    /// y = x.permute(perm).
    Permute { perm: Vec<usize> },
    /// y = x broadcast from `in_shape`.
    Expand { in_shape: Vec<usize> },
    /// y = x.narrow(axis, start, len).
    Narrow {
        axis: usize,
        start: usize,
        in_shape: Vec<usize>,
    },
    /// y = x (a contiguous copy).
    Copy,
    /// y = concat(inputs, axis); `sizes` are the inputs' sizes along it.
    Concat { axis: usize, sizes: Vec<usize> },
    /// y = gather(x, axis, index), `index` seen through `index_layout` (y's shape).
    Gather {
        axis: usize,
        index: Tensor,
        index_layout: Layout,
        in_shape: Vec<usize>,
    },
    /// y = max(x, 0) - x t + log(1 + e^-|x|) (BCE with logits), then averaged (`scale` = 1/n),
    /// summed or left unreduced (`scale` = 1).
    BceWithLogits { x: Tensor, t: Tensor, scale: f32 },
    /// y = conv2d(x, w), plus b along the channels when `bias` (the third input, added in the
    /// kernel's epilogue). `x` is saved as its im2col matrix where the forward built one
    /// (`x_is_cols`). With `relu_out`, y = relu(that), fused into the kernel's store: the
    /// output is saved, and the gradient masked by it (y > 0 where x > 0) first.
    Conv2d {
        x: Option<Tensor>,
        x_is_cols: bool,
        w: Option<Tensor>,
        geometry: ConvGeometry,
        bias: bool,
        relu_out: Option<Tensor>,
    },
    /// y = conv_transpose2d(x, w); `geometry` is that of the conv2d it transposes.
    ConvTranspose2d {
        x: Option<Tensor>,
        w: Option<Tensor>,
        geometry: ConvGeometry,
    },
    /// y = max/avg/adaptive pooling of x; `indices` are the max positions for max pooling.
    Pool2d {
        indices: Option<Tensor>,
        geometry: PoolGeometry,
        /// Max pooling of a relu's output whose node left out relu's gradient mask: applied
        /// here (the window's maximum above 0).
        relu_mask: bool,
    },
}

impl Op {
    /// The tensors the backward rule reads, in a fixed order.
    pub(crate) fn saved(&self) -> Vec<&Tensor> {
        match self {
            Op::Unary { saved, .. } => vec![saved],
            Op::Binary { a, b, out, .. } => [a.as_ref(), b.as_ref(), out.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            Op::BinaryScalar { x, out, .. } | Op::Reduce { x, out, .. } => {
                [x.as_ref(), out.as_ref()].into_iter().flatten().collect()
            }
            Op::Where { cond, .. } => vec![cond],
            Op::Softmax { out, .. } | Op::LogSoftmax { out, .. } => vec![out],
            Op::Matmul { a, b, .. } => [a.as_ref(), b.as_ref()].into_iter().flatten().collect(),
            Op::Conv2d { x, w, relu_out, .. } => [x.as_ref(), w.as_ref(), relu_out.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            Op::ConvTranspose2d { x, w, .. } => {
                [x.as_ref(), w.as_ref()].into_iter().flatten().collect()
            }
            Op::Gather { index, .. } => vec![index],
            Op::BceWithLogits { x, t, .. } => vec![x, t],
            Op::Pool2d { indices, .. } => indices.iter().collect(),
            Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Narrow { .. }
            | Op::Copy
            | Op::Concat { .. } => Vec::new(),
        }
    }
}

/// `g` summed over the axes that were broadcast to reach its shape from `shape`.
pub(crate) fn sum_to(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if g.dims() == shape {
        return Ok(g.clone());
    }
    let lead = g.rank() - shape.len();
    let axes: Vec<isize> = (0..g.rank())
        .filter(|&i| i < lead || (shape[i - lead] == 1 && g.dims()[i] != 1))
        .map(|i| i as isize)
        .collect();
    let summed = if axes.is_empty() {
        g.clone()
    } else {
        g.sum(&axes, true)?
    };
    summed.reshape_to(shape)
}

/// A tensor the rule saved. Rules save what they read, so `Err` here means a bug in kiln.
fn saved(t: &Option<Tensor>) -> Result<&Tensor> {
    t.as_ref()
        .ok_or_else(|| Error::invalid("backward", "internal: a rule read a tensor it did not save"))
}

impl Op {
    /// Gradients of the inputs, in input order (`None` where `needs` is false).
    pub(crate) fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        // Computes the gradient of input `i` only when it is needed.
        macro_rules! grads {
            ($($e:expr),* $(,)?) => {{
                let mut out = Vec::new();
                let mut i = 0;
                $(
                    out.push(if need(i) { Some($e) } else { None });
                    i += 1;
                )*
                let _ = i;
                out
            }};
        }
        Ok(match self {
            // neg: -1; abs: sign(x); exp: y; log: 1/x; sqrt: 1/(2y); rsqrt: -y^3/2;
            // relu: [x > 0]; leaky_relu: x > 0 ? 1 : slope; sigmoid: y(1 - y); tanh: 1 - y^2;
            // gelu: Phi(x) + x phi(x); silu: s + x s (1 - s) with s = sigmoid(x);
            // clamp: [lo <= x <= hi]; identity: 1.   dx = g * f'
            Op::Unary {
                op,
                saved,
                alpha,
                beta,
            } => grads![unary_backward(saved, g, *op, *alpha, *beta)?],

            Op::Binary {
                op,
                a,
                b,
                out,
                a_shape,
                b_shape,
            } => match op {
                // d(a + b) = (g, g); d(a - b) = (g, -g)
                BinaryOp::Add => grads![sum_to(g, a_shape)?, sum_to(g, b_shape)?],
                BinaryOp::Sub => grads![sum_to(g, a_shape)?, sum_to(&g.neg()?, b_shape)?],
                // d(a b) = (g b, g a)
                BinaryOp::Mul => grads![
                    sum_to(&g.mul(saved(b)?)?, a_shape)?,
                    sum_to(&g.mul(saved(a)?)?, b_shape)?
                ],
                // d(a / b) = (g / b, -g a / b^2 = -(g / b) y)
                BinaryOp::Div => {
                    let gb = g.div(saved(b)?)?;
                    grads![
                        sum_to(&gb, a_shape)?,
                        sum_to(&gb.mul(saved(out)?)?.neg()?, b_shape)?
                    ]
                }
                // d(a^b) = (g b a^(b-1), g y ln a)
                BinaryOp::Pow => grads![
                    sum_to(
                        &g.mul(saved(b)?)?
                            .mul(&saved(a)?.pow(&saved(b)?.sub_scalar(1.0)?)?)?,
                        a_shape
                    )?,
                    sum_to(&g.mul(saved(out)?)?.mul(&saved(a)?.log()?)?, b_shape)?,
                ],
                // maximum: a gets g where a > b, b where b > a, each half on a tie (minimum: mirrored)
                BinaryOp::Maximum | BinaryOp::Minimum => {
                    let (a, b) = (saved(a)?, saved(b)?);
                    let wins = if *op == BinaryOp::Maximum {
                        a.gt(b)?
                    } else {
                        a.lt(b)?
                    };
                    let wa = wins.add(&a.eq(b)?.mul_scalar(0.5)?)?;
                    grads![
                        sum_to(&g.mul(&wa)?, a_shape)?,
                        sum_to(&g.mul(&wa.rsub_scalar(1.0)?)?, b_shape)?
                    ]
                }
                // Comparisons are piecewise constant: no gradient (their results never require grad).
                _ => grads![g.zeros_like()?, g.zeros_like()?],
            },

            Op::BinaryScalar {
                op,
                s,
                scalar_left,
                x,
                out,
            } => {
                let s = *s;
                grads![match (op, scalar_left) {
                    (BinaryOp::Add, _) | (BinaryOp::Sub, false) => g.clone(),
                    (BinaryOp::Sub, true) => g.neg()?, // d(s - x) = -g
                    (BinaryOp::Mul, _) => g.mul_scalar(s)?, // d(x s) = g s
                    (BinaryOp::Div, false) => g.div_scalar(s)?, // d(x / s) = g / s
                    (BinaryOp::Div, true) => g.mul(saved(out)?)?.div(saved(x)?)?.neg()?, // d(s / x) = -g y / x
                    // d(x^s) = g s x^(s-1)
                    (BinaryOp::Pow, false) =>
                        g.mul(&saved(x)?.pow_scalar(s - 1.0)?.mul_scalar(s)?)?,
                    // d(s^x) = g y ln s
                    (BinaryOp::Pow, true) => g.mul(saved(out)?)?.mul_scalar(s.ln())?,
                    (BinaryOp::Maximum, _) | (BinaryOp::Minimum, _) => {
                        let x = saved(x)?;
                        let wins = if *op == BinaryOp::Maximum {
                            x.gt_scalar(s)?
                        } else {
                            x.lt_scalar(s)?
                        };
                        g.mul(&wins.add(&x.eq_scalar(s)?.mul_scalar(0.5)?)?)?
                    }
                    _ => g.zeros_like()?,
                }]
            }

            // d(cond ? a : b) = (cond ? g : 0, cond ? 0 : g)
            Op::Where {
                cond,
                a_shape,
                b_shape,
            } => {
                let zero = Tensor::zeros(&[], g.device())?;
                grads![
                    sum_to(&cond.where_cond(g, &zero)?, a_shape)?,
                    sum_to(&cond.where_cond(&zero, g)?, b_shape)?,
                ]
            }

            Op::Reduce {
                op,
                axes,
                keep_shape,
                in_shape,
                x,
                out,
                correction,
            } => {
                let ax: Vec<isize> = axes.iter().map(|&a| a as isize).collect();
                // g with the reduced axes restored (size 1), broadcast to the input shape.
                let g_in = g.reshape_to(keep_shape)?.expand(in_shape)?;
                let n: usize = axes.iter().map(|&a| in_shape[a]).product();
                grads![match op {
                    ReduceOp::Sum => g_in,                              // d sum = g
                    ReduceOp::Mean => g_in.mul_scalar(1.0 / n as f32)?, // d mean = g / n
                    // d max = g [x == max] / #ties
                    ReduceOp::Max | ReduceOp::Min => {
                        let y = saved(out)?.reshape_to(keep_shape)?;
                        let mask = saved(x)?.eq(&y)?;
                        let ties = mask.sum(&ax, true)?;
                        g_in.mul(&mask)?.div(&ties)?
                    }
                    // d var = g 2 (x - mean) / (n - correction)
                    ReduceOp::Var => {
                        let x = saved(x)?;
                        let centered = x.sub(&x.mean(&ax, true)?)?;
                        g_in.mul(&centered)?
                            .mul_scalar(2.0 / (n as f32 - correction))?
                    }
                    ReduceOp::ArgMax | ReduceOp::ArgMin => g_in.zeros_like()?,
                }]
            }

            // dx = y (g - sum(g y))
            Op::Softmax { axis, out } => {
                let gy = g.mul(out)?;
                grads![gy.sub(&out.mul(&gy.sum(&[*axis], true)?)?)?]
            }
            // dx = g - softmax(x) sum(g) = g - e^y sum(g)
            Op::LogSoftmax { axis, out } => {
                grads![g.sub(&out.exp()?.mul(&g.sum(&[*axis], true)?)?)?]
            }

            // d(a @ b) = (g @ b^T, a^T @ g), summed over broadcast batch axes
            // (for a transposed 2-D operand, (b g^T)^T and (g^T a)^T: the same values, laid out
            // so that the transposing view's own backward leaves them contiguous, no copy)
            Op::Matmul {
                a,
                b,
                a_shape,
                b_shape,
                a_t,
                b_t,
            } => grads![
                if *a_t {
                    saved(b)?.matmul(&g.t()?)?.t()?
                } else {
                    sum_to(&g.matmul(&saved(b)?.t()?)?, a_shape)?
                },
                if *b_t {
                    g.t()?.matmul(saved(a)?)?.t()?
                } else {
                    sum_to(&saved(a)?.t()?.matmul(g)?, b_shape)?
                },
            ],

            Op::Reshape { in_shape } => grads![g.reshape_to(in_shape)?],
            Op::Permute { perm } => {
                let mut inverse = vec![0isize; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i as isize;
                }
                grads![g.permute(&inverse)?]
            }
            Op::Expand { in_shape } => grads![sum_to(g, in_shape)?],
            // The gradient of a slice is g placed in a zero tensor of the input's shape.
            Op::Narrow {
                axis,
                start,
                in_shape,
            } => {
                let full = Tensor::zeros(in_shape, g.device())?;
                let region = full
                    .layout
                    .narrow("narrow", *axis, *start, g.dims()[*axis])?;
                crate::ops::elementwise::copy_into(g, &full, &region)?;
                grads![full]
            }
            Op::Copy => grads![g.clone()],
            // Each input's gradient is its slice of g.
            Op::Concat { axis, sizes } => {
                let mut start = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for (i, &len) in sizes.iter().enumerate() {
                    out.push(if need(i) {
                        Some(g.narrow(*axis as isize, start, len)?)
                    } else {
                        None
                    });
                    start += len;
                }
                out
            }
            // Scatter-add of g back to the gathered positions (deterministic: each input
            // element sums the gradients of the positions that picked it).
            Op::Gather {
                axis,
                index,
                index_layout,
                in_shape,
            } => {
                grads![gather_backward(g, index, index_layout, *axis, in_shape)?]
            }
            // conv2d: dx = conv_transpose2d(g, w) (conv2d_bwd_input), dw = correlation of x with
            // g over every output position (conv2d_bwd_weight), db = g summed over (n, h, w);
            // through a fused relu, g masked by the output first
            Op::Conv2d {
                x,
                x_is_cols,
                w,
                geometry,
                bias,
                relu_out,
            } => {
                let masked;
                let g = match relu_out {
                    Some(y) => {
                        masked = unary_backward(y, g, UnaryOp::Relu, 0.0, 0.0)?;
                        &masked
                    }
                    None => g,
                };
                let mut out = grads![
                    conv_bwd_input(g, saved(w)?, geometry)?,
                    conv_bwd_weight(g, saved(x)?, geometry, *x_is_cols)?,
                    g.sum(&[0, 2, 3], false)?,
                ];
                out.truncate(2 + usize::from(*bias));
                out
            }
            // conv_transpose2d is conv2d_bwd_input: dx = conv2d(g, w), dw = correlation of g
            // (the conv's input) with x (the conv's output gradient)
            Op::ConvTranspose2d { x, w, geometry } => grads![
                conv_fwd(g, saved(w)?, geometry, None)?,
                conv_bwd_weight(saved(x)?, g, geometry, false)?,
            ],
            // max: g goes to the chosen element of each window (times relu's derivative at the
            // window's maximum with `relu_mask`); average: g / window size to every element of
            // the window (summed over overlapping windows)
            Op::Pool2d {
                indices,
                geometry,
                relu_mask,
            } => grads![pool_backward(g, geometry, indices.as_ref(), *relu_mask)?],
            // d/dx = (sigmoid(x) - t) scale and d/dt = -x scale, times g (elementwise when
            // unreduced)
            Op::BceWithLogits { x, t, scale } => {
                grads![
                    x.sigmoid()?.sub(t)?.mul_scalar(*scale)?.mul(g)?,
                    x.mul_scalar(-*scale)?.mul(g)?,
                ]
            }
        })
    }
}
