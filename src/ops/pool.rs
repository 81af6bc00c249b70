//! 2-D pooling (NCHW): max, average and adaptive average, forward and backward.

use bytemuck::{Pod, Zeroable};

use super::grid;
use crate::autograd::{record, Op};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, Variant};
use crate::shape::Layout;
use crate::tensor::Tensor;

/// Uniform parameters of `shaders/pool.wgsl` (its `Params` struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct PoolParams {
    pub planes: u32,
    pub h: u32,
    pub w: u32,
    pub oh: u32,
    pub ow: u32,
    pub kh: u32,
    pub kw: u32,
    pub sh: u32,
    pub sw: u32,
    pub ph: u32,
    pub pw: u32,
    pub dh: u32,
    pub dw: u32,
    pub mode: u32,
    pub idx_off: u32,
    /// 1 when every element index is below 2^22 (the kernels then divide in f32).
    pub small: u32,
    /// Max pooling backward: 1 to apply the gradient mask of the relu whose output was pooled.
    pub relu_mask: u32,
}

pub(crate) const MODE_MAX: u32 = 0;
pub(crate) const MODE_AVG_WITH_PAD: u32 = 1;
pub(crate) const MODE_AVG_VALID: u32 = 2;
pub(crate) const MODE_ADAPTIVE: u32 = 3;

/// One pooling: input (n, c, h, w), output (n, c, oh, ow), windows and mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolGeometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub k: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub mode: u32,
}

impl PoolGeometry {
    /// Max pooling over 2x2 windows at stride 2 with no padding or dilation, of planes of even
    /// width: the `max_pool2x2` kernels, which read and write rows in pairs.
    fn is_max_2x2(&self) -> bool {
        self.mode == MODE_MAX
            && self.k == [2, 2]
            && self.stride == [2, 2]
            && self.padding == [0, 0]
            && self.dilation == [1, 1]
            && self.w.is_multiple_of(2)
    }

    /// The forward kernel.
    fn forward_kernel(&self) -> Kernel {
        if self.is_max_2x2() {
            Kernel::MaxPool2x2Fwd
        } else {
            Kernel::Pool2dFwd
        }
    }

    fn params(&self, idx_off: usize) -> PoolParams {
        PoolParams {
            planes: (self.n * self.c) as u32,
            h: self.h as u32,
            w: self.w as u32,
            oh: self.oh as u32,
            ow: self.ow as u32,
            kh: self.k[0] as u32,
            kw: self.k[1] as u32,
            sh: self.stride[0] as u32,
            sw: self.stride[1] as u32,
            ph: self.padding[0] as u32,
            pw: self.padding[1] as u32,
            dh: self.dilation[0] as u32,
            dw: self.dilation[1] as u32,
            mode: self.mode,
            idx_off: idx_off as u32,
            small: (self.n * self.c * self.h.max(self.oh) * self.w.max(self.ow) < 1 << 22) as u32,
            relu_mask: 0,
        }
    }
}

/// Options of [`Tensor::max_pool2d`] and [`Tensor::avg_pool2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dOptions {
    /// Window size, (height, width).
    pub kernel: [usize; 2],
    /// Step between windows; PyTorch's default is the kernel size.
    pub stride: [usize; 2],
    /// Implicit padding on each side (at most half the kernel): -inf for max, 0 for average.
    pub padding: [usize; 2],
    /// Spacing between window taps (max pooling only).
    pub dilation: [usize; 2],
    /// Average pooling: divide by the full window, padding included (PyTorch's default), or
    /// by the number of real elements.
    pub count_include_pad: bool,
}

impl Pool2dOptions {
    /// Windows of `kernel` with stride equal to the kernel, no padding (PyTorch's defaults).
    pub fn new(kernel: [usize; 2]) -> Self {
        Pool2dOptions {
            kernel,
            stride: kernel,
            padding: [0, 0],
            dilation: [1, 1],
            count_include_pad: true,
        }
    }
}

pub(crate) fn geometry(
    op: &'static str,
    dims: &[usize],
    o: &Pool2dOptions,
    mode: u32,
) -> Result<PoolGeometry> {
    if dims.len() != 4 {
        return Err(Error::shape(
            op,
            format!("input must have rank 4 (N, C, H, W), got shape {:?}", dims),
        ));
    }
    if o.kernel.contains(&0) || o.stride.contains(&0) || o.dilation.contains(&0) {
        return Err(Error::invalid(
            op,
            format!(
                "kernel {:?}, stride {:?} and dilation {:?} must be positive",
                o.kernel, o.stride, o.dilation
            ),
        ));
    }
    let (h, w) = (dims[2], dims[3]);
    let mut out = [0; 2];
    for i in 0..2 {
        let span = o.dilation[i] as u128 * (o.kernel[i] as u128 - 1) + 1;
        if 2 * o.padding[i] as u128 > span {
            return Err(Error::invalid(
                op,
                format!(
                    "padding {:?} must be at most half of the (dilated) kernel {:?}",
                    o.padding, o.kernel
                ),
            ));
        }
        let padded = [h, w][i] as u128 + 2 * o.padding[i] as u128;
        if span > padded || padded > u32::MAX as u128 {
            return Err(Error::shape(
                op,
                format!(
                    "kernel {:?} is larger than the padded input of shape {:?}",
                    o.kernel, dims
                ),
            ));
        }
        out[i] = ((padded - span) / o.stride[i] as u128 + 1) as usize;
    }
    Ok(PoolGeometry {
        n: dims[0],
        c: dims[1],
        h,
        w,
        oh: out[0],
        ow: out[1],
        k: o.kernel,
        stride: o.stride,
        padding: o.padding,
        dilation: o.dilation,
        mode,
    })
}

/// Pools `x`; with `relu_mask` (max pooling of a relu's output, whose own node then leaves the
/// mask out) the backward also applies relu's gradient mask.
fn pool_forward(x: &Tensor, g: PoolGeometry, relu_mask: bool) -> Result<Tensor> {
    let x = x.dense()?;
    let total = g.n * g.c * g.oh * g.ow;
    // Max pooling writes the values and, right after them, the chosen indices when a
    // gradient will need them.
    let keep = g.mode == MODE_MAX && crate::autograd::is_grad_enabled() && x.requires_grad_flag();
    let slots = if keep { 2 } else { 1 };
    let both = Tensor::uninit("pool2d", &[slots, total], x.device())?;
    let p = g.params(if keep { total } else { u32::MAX as usize });
    x.device().dispatch(
        g.forward_kernel(),
        &[x.buffer()],
        both.buffer(),
        bytemuck::bytes_of(&p),
        grid(total, 256),
    );
    let values = both.with_layout(Layout::contiguous(&[g.n, g.c, g.oh, g.ow]));
    let indices = keep.then(|| {
        let mut l = Layout::contiguous(&[g.n, g.c, g.oh, g.ow]);
        l.offset = total;
        both.with_layout(l)
    });
    Ok(record(values, &[&x], |_| Op::Pool2d {
        indices,
        geometry: g,
        relu_mask,
    }))
}

/// Gradient of a pooling: `g` routed back to the input positions. Not recorded.
pub(crate) fn pool_backward(
    g: &Tensor,
    geo: &PoolGeometry,
    indices: Option<&Tensor>,
    relu_mask: bool,
) -> Result<Tensor> {
    let g = g.dense()?;
    let out = Tensor::uninit("pool2d_backward", &[geo.n, geo.c, geo.h, geo.w], g.device())?;
    let total = geo.n * geo.c * geo.h * geo.w;
    match indices {
        Some(idx) => {
            // The values come first in the indices' buffer (pool_forward): the mask reads them.
            debug_assert!(!relu_mask || idx.layout.offset == geo.n * geo.c * geo.oh * geo.ow);
            let p = PoolParams {
                relu_mask: relu_mask as u32,
                ..geo.params(idx.layout.offset)
            };
            // The 2x2 kernel runs one invocation per 2x2 block of dx.
            let (kernel, invocations) = if geo.is_max_2x2() {
                (
                    Kernel::MaxPool2x2Bwd,
                    geo.n * geo.c * geo.h.div_ceil(2) * (geo.w / 2),
                )
            } else {
                (Kernel::MaxPool2dBwd, total)
            };
            g.device().dispatch(
                kernel,
                &[g.buffer(), idx.buffer()],
                out.buffer(),
                bytemuck::bytes_of(&p),
                grid(invocations, 256),
            );
        }
        None => {
            let p = geo.params(0);
            g.device().dispatch(
                Kernel::AvgPool2dBwd,
                &[g.buffer()],
                out.buffer(),
                bytemuck::bytes_of(&p),
                grid(total, 256),
            );
        }
    }
    Ok(out)
}

fn unbatched(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.rank() == 3 {
        f(&x.unsqueeze(0)?)?.squeeze(Some(0))
    } else {
        f(x)
    }
}

impl Tensor {
    /// Max pooling over windows of an (N, C, H, W) (or (C, H, W)) input, as
    /// `torch.nn.functional.max_pool2d` (`ceil_mode = false`). The gradient goes to the first
    /// maximum of each window in row-major scan order (a NaN counts as the maximum).
    ///
    /// ```
    /// use kiln::{Pool2dOptions, Tensor};
    /// # let dev = kiln::Device::default_device()?;
    /// let x = Tensor::arange(0.0, 16.0, 1.0, &dev)?.reshape(&[1, 1, 4, 4])?;
    /// let y = x.max_pool2d(&Pool2dOptions::new([2, 2]))?;
    /// assert_eq!(y.to_vec()?, vec![5.0, 7.0, 13.0, 15.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn max_pool2d(&self, opts: &Pool2dOptions) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[self],
            |_| crate::infer::graph::OpKind::Pool {
                opts: *opts,
                max: true,
            },
            || {
                unbatched(self, |x| {
                    pool_forward(x, geometry("max_pool2d", x.dims(), opts, MODE_MAX)?, false)
                })
            },
        )
    }

    /// [`Tensor::max_pool2d`] of a relu's output whose node leaves out relu's gradient mask,
    /// applied here instead (the pooled maximum above 0): see [`Tensor::conv2d_relu_max_pool2d`].
    fn max_pool2d_of_relu(&self, opts: &Pool2dOptions) -> Result<Tensor> {
        unbatched(self, |x| {
            pool_forward(x, geometry("max_pool2d", x.dims(), opts, MODE_MAX)?, true)
        })
    }

    /// conv2d, relu and max pooling in a row (what [`crate::nn::Sequential`] runs for those
    /// three layers): relu applied as the convolution stores its output, and relu's gradient
    /// mask by the pool's backward, which reads the pooled maxima; so no relu pass runs,
    /// forward or backward. While a graph is captured, the three ops as such.
    pub(crate) fn conv2d_relu_max_pool2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        conv: &crate::Conv2dOptions,
        pool: &Pool2dOptions,
    ) -> Result<Tensor> {
        if crate::infer::capture::capturing() {
            return self
                .conv2d_then(weight, bias, conv, true, true)?
                .max_pool2d(pool);
        }
        self.conv2d_then(weight, bias, conv, true, false)?
            .max_pool2d_of_relu(pool)
    }

    /// Average pooling, as `torch.nn.functional.avg_pool2d` (`ceil_mode = false`; dilation
    /// must be 1).
    pub fn avg_pool2d(&self, opts: &Pool2dOptions) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[self],
            |_| crate::infer::graph::OpKind::Pool {
                opts: *opts,
                max: false,
            },
            || {
                if opts.dilation != [1, 1] {
                    return Err(Error::invalid(
                        "avg_pool2d",
                        format!("dilation must be [1, 1], got {:?}", opts.dilation),
                    ));
                }
                let mode = if opts.count_include_pad {
                    MODE_AVG_WITH_PAD
                } else {
                    MODE_AVG_VALID
                };
                unbatched(self, |x| {
                    pool_forward(x, geometry("avg_pool2d", x.dims(), opts, mode)?, false)
                })
            },
        )
    }

    /// Adaptive average pooling to an output of `size` (height, width), as
    /// `torch.nn.functional.adaptive_avg_pool2d`; `[1, 1]` is global average pooling.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::ones(&[2, 3, 7, 5], &dev)?;
    /// assert_eq!(x.adaptive_avg_pool2d([1, 1])?.dims(), &[2, 3, 1, 1]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn adaptive_avg_pool2d(&self, size: [usize; 2]) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[self],
            |_| crate::infer::graph::OpKind::AdaptiveAvgPool { size },
            || {
                const OP: &str = "adaptive_avg_pool2d";
                unbatched(self, |x| {
                    if x.rank() != 4 {
                        return Err(Error::shape(
                            OP,
                            format!(
                                "input must have rank 4 (N, C, H, W), got shape {:?}",
                                x.dims()
                            ),
                        ));
                    }
                    let (h, w) = (x.dims()[2], x.dims()[3]);
                    if size.contains(&0) || h == 0 || w == 0 {
                        return Err(Error::invalid(
                            OP,
                            format!(
                                "output size {size:?} and input {:?} must be non-empty",
                                x.dims()
                            ),
                        ));
                    }
                    let g = adaptive_geometry(x.dims(), size)?;
                    pool_forward(x, g, false)
                })
            },
        )
    }
}

/// Geometry of adaptive average pooling of (N, C, H, W) to `size`.
pub(crate) fn adaptive_geometry(dims: &[usize], size: [usize; 2]) -> Result<PoolGeometry> {
    if dims.len() != 4 {
        return Err(Error::shape(
            "adaptive_avg_pool2d",
            format!("input must have rank 4 (N, C, H, W), got shape {dims:?}"),
        ));
    }
    Ok(PoolGeometry {
        n: dims[0],
        c: dims[1],
        h: dims[2],
        w: dims[3],
        oh: size[0],
        ow: size[1],
        k: [1, 1],
        stride: [1, 1],
        padding: [0, 0],
        dilation: [1, 1],
        mode: MODE_ADAPTIVE,
    })
}

/// Records a pooling of contiguous `x` into `out` (contiguous from offset 0), without max
/// indices (for inference). Not recorded for autograd.
pub(crate) fn pool_into(
    x: &Tensor,
    out: &Tensor,
    g: &PoolGeometry,
    variant: Variant,
) -> Result<()> {
    let total = g.n * g.c * g.oh * g.ow;
    let p = g.params(u32::MAX as usize);
    x.device().dispatch_variant(
        g.forward_kernel(),
        variant,
        &[x.buffer()],
        &[out.buffer()],
        bytemuck::bytes_of(&p),
        grid(total, 256),
    )
}
