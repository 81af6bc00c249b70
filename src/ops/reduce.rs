//! Reductions along axes (sum, mean, max, min, argmax, argmin, variance) and softmax.

use bytemuck::{Pod, Zeroable};

use super::{grid, pack};
use crate::autograd::{record, Op};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::shape::{contiguous_strides, normalize_axes, normalize_axis, MAX_RANK};
use crate::tensor::Tensor;

/// Uniform parameters of `shaders/reduce.wgsl` (its `Params` struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ReduceParams {
    pub n_out: u32,
    pub rank: u32,
    pub red_len: u32,
    pub op: u32,
    pub off_in: u32,
    pub red_stride: u32,
    pub out_red_stride: u32,
    pub correction: f32,
    pub shape: [u32; MAX_RANK],
    pub sin: [u32; MAX_RANK],
    pub sout: [u32; MAX_RANK],
}

/// Reduction op codes of `reduce_fwd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum ReduceOp {
    Sum = 0,
    Mean = 1,
    Max = 2,
    Min = 3,
    ArgMax = 4,
    ArgMin = 5,
    Var = 6,
}

impl ReduceOp {
    fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::ArgMax => "argmax",
            ReduceOp::ArgMin => "argmin",
            ReduceOp::Var => "var",
        }
    }

    fn needs_elements(self) -> bool {
        matches!(
            self,
            ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax | ReduceOp::ArgMin
        )
    }
}

/// The reduced axes of `x` as one run of `len` elements `stride` apart, if their strides chain
/// (true for any set of axes of contiguous data that are adjacent once size-1 axes are ignored).
fn merged_run(x: &Tensor, axes: &[usize]) -> Option<(usize, usize)> {
    let mut run: Vec<(usize, usize)> = axes
        .iter()
        .map(|&a| (x.dims()[a], x.strides()[a]))
        .filter(|&(d, _)| d != 1)
        .collect();
    run.sort_by_key(|&(_, s)| std::cmp::Reverse(s));
    let len = run.iter().map(|&(d, _)| d).product();
    for w in run.windows(2) {
        if w[0].1 != w[1].0 * w[1].1 {
            return None;
        }
    }
    Some((len, run.last().map_or(1, |&(_, s)| s)))
}

/// Elements each workgroup of the first stage reduces.
const SPLIT_CHUNK: usize = 2048;

/// Rows to reduce: `shape` (kept axes) with input strides `in_strides` from `offset`, each
/// `len` elements `stride` apart; results written at the positions given by `out_strides`.
struct Run<'a> {
    shape: &'a [usize],
    in_strides: &'a [usize],
    offset: usize,
    len: usize,
    stride: usize,
    out_strides: &'a [usize],
}

fn dispatch_rows(src: &Tensor, op: ReduceOp, correction: f32, run: &Run<'_>, out: &Tensor) {
    let n_out: usize = run.shape.iter().product();
    if n_out == 0 {
        return;
    }
    let p = ReduceParams {
        n_out: n_out as u32,
        rank: run.shape.len() as u32,
        red_len: run.len as u32,
        op: op as u32,
        off_in: run.offset as u32,
        red_stride: run.stride as u32,
        out_red_stride: 0,
        correction,
        shape: pack(run.shape.iter().copied()),
        sin: pack(run.in_strides.iter().copied()),
        sout: pack(run.out_strides.iter().copied()),
    };
    let serial = super::tune::serial_rows(src.device());
    let (kernel, per_group) = if serial {
        (Kernel::ReduceSerialFwd, 64)
    } else {
        (Kernel::ReduceFwd, 1)
    };
    src.device().dispatch(
        kernel,
        &[src.buffer()],
        out.buffer(),
        bytemuck::bytes_of(&p),
        grid(n_out, per_group),
    );
}

/// `out` = the sum of `parts` (contiguous, (s, ...)) over its first axis: the partial products
/// of a split matmul. `out` is contiguous with `parts.numel() / s` elements.
pub(crate) fn sum_parts_into(parts: &Tensor, out: &Tensor) {
    let len = parts.dims()[0];
    let n = out.numel();
    let run = Run {
        shape: &[n],
        in_strides: &[1],
        offset: parts.layout.offset,
        len,
        stride: n,
        out_strides: &[1],
    };
    dispatch_rows(parts, ReduceOp::Sum, 0.0, &run, out);
}

/// Sum, mean, max or min of long rows: partial results of chunks of each row, then the
/// partials (and the tail that does not fill a chunk) combined. Returns shape `kept`.
fn two_stage(
    src: &Tensor,
    op: ReduceOp,
    kept: &[usize],
    kept_strides: &[usize],
    len: usize,
    stride: usize,
) -> Result<Tensor> {
    let n_out: usize = kept.iter().product();
    let chunks = len.div_ceil(SPLIT_CHUNK).min(1024);
    let chunk_len = len / chunks;
    let tail = len - chunks * chunk_len;
    let first = if op == ReduceOp::Mean {
        ReduceOp::Sum
    } else {
        op
    };
    let partial = Tensor::uninit(op.name(), &[n_out, chunks], src.device())?;
    let mut shape = kept.to_vec();
    shape.push(chunks);
    let mut in_strides = kept_strides.to_vec();
    in_strides.push(chunk_len * stride);
    let mut out_strides: Vec<usize> = contiguous_strides(kept)
        .iter()
        .map(|s| s * chunks)
        .collect();
    out_strides.push(1);
    let run = Run {
        shape: &shape,
        in_strides: &in_strides,
        offset: src.layout.offset,
        len: chunk_len,
        stride,
        out_strides: &out_strides,
    };
    dispatch_rows(src, first, 0.0, &run, &partial);
    let mut total = reduce(&partial, first, &[-1], false, 0.0)?;
    if tail > 0 {
        let rest = Tensor::uninit(op.name(), &[n_out], src.device())?;
        let run = Run {
            shape: kept,
            in_strides: kept_strides,
            offset: src.layout.offset + chunks * chunk_len * stride,
            len: tail,
            stride,
            out_strides: &contiguous_strides(kept),
        };
        dispatch_rows(src, first, 0.0, &run, &rest);
        total = match first {
            ReduceOp::Max => total.maximum(&rest)?,
            ReduceOp::Min => total.minimum(&rest)?,
            _ => total.add(&rest)?,
        };
    }
    if op == ReduceOp::Mean {
        total = total.mul_scalar(1.0 / len as f32)?;
    }
    Ok(total)
}

/// One workgroup per row of the input: `kept` axes index the rows, the reduced elements of a
/// row are `len` apart by `stride`.
struct Rows {
    kept: Vec<usize>,
    len: usize,
    stride: usize,
}

fn rows_of(op: &'static str, x: &Tensor, axes: &[usize]) -> Result<(Tensor, Rows)> {
    let kept: Vec<usize> = (0..x.rank()).filter(|a| !axes.contains(a)).collect();
    if let Some((len, stride)) = merged_run(x, axes) {
        return Ok((x.clone(), Rows { kept, len, stride }));
    }
    // Not expressible as one strided run: move the reduced axes last and copy.
    let perm: Vec<isize> = kept.iter().chain(axes).map(|&a| a as isize).collect();
    let y = x.detach().permute(&perm)?.contiguous()?;
    let k = kept.len();
    let (len, stride) = merged_run(&y, &(k..y.rank()).collect::<Vec<_>>())
        .ok_or_else(|| Error::shape(op, "internal: contiguous copy is not mergeable"))?;
    Ok((
        y,
        Rows {
            kept: (0..k).collect(),
            len,
            stride,
        },
    ))
}

/// A reduction of a tensor without elements, as PyTorch: sums are 0, means and variances
/// NaN, and max, min and their indices over an empty axis an `Err`.
fn reduce_empty(x: &Tensor, op: ReduceOp, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let dims = x.dims();
    let reduced: usize = axes.iter().map(|&a| dims[a]).product();
    let kept: Vec<usize> = (0..dims.len())
        .filter(|a| !axes.contains(a))
        .map(|a| dims[a])
        .collect();
    let n_out: usize = kept.iter().product();
    if reduced == 0 && op.needs_elements() && n_out > 0 {
        return Err(Error::shape(
            op.name(),
            format!("cannot reduce over an empty axis (shape {dims:?}, axes {axes:?})"),
        ));
    }
    let out_shape: Vec<usize> = if keepdim {
        dims.iter()
            .enumerate()
            .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
            .collect()
    } else {
        kept
    };
    let value = match op {
        ReduceOp::Mean | ReduceOp::Var => f32::NAN,
        _ => 0.0,
    };
    Tensor::full(&out_shape, value, x.device())
}

pub(crate) fn reduce(
    x: &Tensor,
    op: ReduceOp,
    axes: &[isize],
    keepdim: bool,
    correction: f32,
) -> Result<Tensor> {
    crate::infer::capture::traced(
        &[x],
        |_| crate::infer::graph::OpKind::Reduce {
            op,
            axes: axes.to_vec(),
            keepdim,
            correction,
        },
        || {
            let name = op.name();
            let axes = normalize_axes(name, axes, x.rank())?;
            if x.numel() == 0 {
                return reduce_empty(x, op, &axes, keepdim);
            }
            let out = reduce_raw(x, op, &axes, keepdim, correction)?;
            if matches!(op, ReduceOp::ArgMax | ReduceOp::ArgMin) {
                return Ok(out);
            }
            let keep_shape: Vec<usize> = x
                .dims()
                .iter()
                .enumerate()
                .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
                .collect();
            Ok(record(out, &[x], |y| Op::Reduce {
                op,
                axes: axes.clone(),
                keep_shape,
                in_shape: x.shape(),
                x: matches!(op, ReduceOp::Max | ReduceOp::Min | ReduceOp::Var).then(|| x.detach()),
                out: matches!(op, ReduceOp::Max | ReduceOp::Min).then(|| y.clone()),
                correction,
            }))
        },
    )
}

/// The reduction of `x` over `axes` (normalised, `x` not empty), not recorded. Over axes that
/// are not one strided run (a per-channel sum of NCHW data over N, H and W), the axes that
/// form the innermost run are reduced first, then the rest of the smaller result, instead of
/// copying `x` with the reduced axes moved last.
fn reduce_raw(
    x: &Tensor,
    op: ReduceOp,
    axes: &[usize],
    keepdim: bool,
    correction: f32,
) -> Result<Tensor> {
    let name = op.name();
    // Reductions whose partial results combine (in stages, or in two dispatches).
    let splittable = matches!(
        op,
        ReduceOp::Sum | ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min
    );
    if splittable && merged_run(x, axes).is_none() {
        let inner = innermost_run(x, axes);
        if !inner.is_empty() && inner.len() < axes.len() {
            // The inner axes stay with size 1, reduced again (a no-op) to drop them.
            let partial = reduce_raw(x, op, &inner, true, correction)?;
            return reduce_raw(&partial, op, axes, keepdim, correction);
        }
    }
    let (src, rows) = rows_of(name, x, axes)?;
    let kept_shape: Vec<usize> = rows.kept.iter().map(|&a| src.dims()[a]).collect();
    let n_out: usize = kept_shape.iter().product();
    if rows.len == 0 && op.needs_elements() && (n_out > 0 || kept_shape.is_empty()) {
        return Err(Error::shape(
            name,
            format!(
                "cannot reduce over an empty axis (shape {:?}, axes {axes:?})",
                x.dims()
            ),
        ));
    }
    let out_shape: Vec<usize> = if keepdim {
        x.dims()
            .iter()
            .enumerate()
            .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
            .collect()
    } else {
        kept_shape.clone()
    };
    let kept_strides: Vec<usize> = rows.kept.iter().map(|&a| src.strides()[a]).collect();
    let out = if splittable
        && super::tune::reduce_in_two_stages(n_out, rows.len)
        && kept_shape.len() < MAX_RANK
    {
        two_stage(&src, op, &kept_shape, &kept_strides, rows.len, rows.stride)?
            .reshape_to(&out_shape)?
    } else {
        let out = Tensor::uninit(name, &out_shape, x.device())?;
        if n_out > 0 {
            let run = Run {
                shape: &kept_shape,
                in_strides: &kept_strides,
                offset: src.layout.offset,
                len: rows.len,
                stride: rows.stride,
                out_strides: &contiguous_strides(&kept_shape),
            };
            dispatch_rows(&src, op, correction, &run, &out);
        }
        out
    };
    Ok(out)
}

/// The reduced axes that chain into one run from the smallest stride up.
fn innermost_run(x: &Tensor, axes: &[usize]) -> Vec<usize> {
    let mut by_stride: Vec<usize> = axes.iter().copied().filter(|&a| x.dims()[a] != 1).collect();
    by_stride.sort_by_key(|&a| x.strides()[a]);
    let mut run: Vec<usize> = Vec::new();
    for a in by_stride {
        let chains = match run.last() {
            None => true,
            Some(&b) => x.strides()[a] == x.strides()[b] * x.dims()[b],
        };
        if !chains {
            break;
        }
        run.push(a);
    }
    run
}

fn softmax_like(x: &Tensor, axis: isize, kernel: Kernel, name: &'static str) -> Result<Tensor> {
    crate::infer::capture::traced(
        &[x],
        |_| crate::infer::graph::OpKind::Softmax {
            axis,
            log: name == "log_softmax",
        },
        || {
            let axis = normalize_axis(name, axis, x.rank().max(1))?;
            if x.rank() == 0 {
                let x1 = x.reshape(&[1])?;
                return softmax_like(&x1, 0, kernel, name)?.reshape(&[]);
            }
            let out = Tensor::uninit(name, x.dims(), x.device())?;
            let kept: Vec<usize> = (0..x.rank()).filter(|&a| a != axis).collect();
            let kept_shape: Vec<usize> = kept.iter().map(|&a| x.dims()[a]).collect();
            let n_out: usize = kept_shape.iter().product();
            if n_out > 0 && x.dims()[axis] > 0 {
                let p = ReduceParams {
                    n_out: n_out as u32,
                    rank: kept.len() as u32,
                    red_len: x.dims()[axis] as u32,
                    op: 0,
                    off_in: x.layout.offset as u32,
                    red_stride: x.strides()[axis] as u32,
                    out_red_stride: out.strides()[axis] as u32,
                    correction: 0.0,
                    shape: pack(kept_shape.iter().copied()),
                    sin: pack(kept.iter().map(|&a| x.strides()[a])),
                    sout: pack(kept.iter().map(|&a| out.strides()[a])),
                };
                x.device().dispatch(
                    kernel,
                    &[x.buffer()],
                    out.buffer(),
                    bytemuck::bytes_of(&p),
                    grid(n_out, 1),
                );
            }
            let ax = axis as isize;
            Ok(record(out, &[x], |y| {
                if kernel == Kernel::SoftmaxFwd {
                    Op::Softmax {
                        axis: ax,
                        out: y.clone(),
                    }
                } else {
                    Op::LogSoftmax {
                        axis: ax,
                        out: y.clone(),
                    }
                }
            }))
        },
    )
}

impl Tensor {
    /// Sum over `axes` (all axes when empty); reduced axes are kept with size 1 if `keepdim`.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[2, 2], &dev)?;
    /// assert_eq!(t.sum(&[0], false)?.to_vec()?, vec![4.0, 6.0]);
    /// assert_eq!(t.sum(&[-1], true)?.dims(), &[2, 1]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn sum(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        reduce(self, ReduceOp::Sum, axes, keepdim, 0.0)
    }

    /// Sum of all elements, as a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.sum(&[], false)
    }

    /// Mean over `axes` (all axes when empty); NaN over an empty axis.
    pub fn mean(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        reduce(self, ReduceOp::Mean, axes, keepdim, 0.0)
    }

    /// Mean of all elements, as a rank-0 tensor.
    pub fn mean_all(&self) -> Result<Tensor> {
        self.mean(&[], false)
    }

    /// Largest value over `axes` (all when empty); NaN if any element is NaN.
    /// The gradient is shared equally among tied maxima (as PyTorch's `amax`).
    pub fn max(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        reduce(self, ReduceOp::Max, axes, keepdim, 0.0)
    }

    /// Smallest value over `axes` (all when empty); NaN if any element is NaN.
    /// The gradient is shared equally among tied minima (as PyTorch's `amin`).
    pub fn min(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        reduce(self, ReduceOp::Min, axes, keepdim, 0.0)
    }

    /// Index of the largest value along `axis`, as f32 (exact below 2^24). Ties give the
    /// first index; a NaN counts as the largest value (as in PyTorch).
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::from_slice(&[1.0, 5.0, 5.0, 0.0], &[4], &dev)?;
    /// assert_eq!(t.argmax(0, false)?.to_scalar()?, 1.0);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn argmax(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        reduce(self, ReduceOp::ArgMax, &[axis], keepdim, 0.0)
    }

    /// Index of the smallest value along `axis`, as f32. Ties give the first index.
    pub fn argmin(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        reduce(self, ReduceOp::ArgMin, &[axis], keepdim, 0.0)
    }

    /// Variance over `axes` (all when empty), dividing by `n - correction` (PyTorch's default
    /// correction is 1, the unbiased estimate). NaN when `n <= correction`.
    pub fn var(&self, axes: &[isize], keepdim: bool, correction: usize) -> Result<Tensor> {
        reduce(self, ReduceOp::Var, axes, keepdim, correction as f32)
    }

    /// Standard deviation: the square root of [`Tensor::var`].
    pub fn std(&self, axes: &[isize], keepdim: bool, correction: usize) -> Result<Tensor> {
        self.var(axes, keepdim, correction)?.sqrt()
    }

    /// exp(x) / sum(exp(x)) along `axis`, computed with the row maximum subtracted.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::from_slice(&[1000.0, 1000.0], &[1, 2], &dev)?;
    /// assert_eq!(t.softmax(-1)?.to_vec()?, vec![0.5, 0.5]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn softmax(&self, axis: isize) -> Result<Tensor> {
        softmax_like(self, axis, Kernel::SoftmaxFwd, "softmax")
    }

    /// log(softmax(x)) along `axis`, computed as x - max - log(sum(exp(x - max))).
    pub fn log_softmax(&self, axis: isize) -> Result<Tensor> {
        softmax_like(self, axis, Kernel::LogSoftmaxFwd, "log_softmax")
    }
}
