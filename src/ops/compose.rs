//! Ops built from other ops: their gradients, capture into frozen graphs and device checks come
//! from the ops they are made of. Each follows the PyTorch function of the same name.

use crate::error::{Error, Result};
use crate::shape::{normalize_axes, normalize_axis};
use crate::tensor::Tensor;

impl Tensor {
    /// `value` where `mask` is non-zero, `self` elsewhere (`mask` broadcasts to `self`'s
    /// shape), as `torch.Tensor.masked_fill`. The gradient reaches `self` where it was kept.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::from_slice(&[1.0, 2.0, 3.0], &[3], &dev)?;
    /// let mask = kiln::Tensor::from_slice(&[0.0, 1.0, 0.0], &[3], &dev)?;
    /// assert_eq!(x.masked_fill(&mask, f32::NEG_INFINITY)?.to_vec()?, vec![1.0, f32::NEG_INFINITY, 3.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn masked_fill(&self, mask: &Tensor, value: f32) -> Result<Tensor> {
        const OP: &str = "masked_fill";
        self.check_device(OP, mask)?;
        let shape = crate::shape::broadcast_shapes(OP, self.dims(), mask.dims())?;
        if shape != self.dims() {
            return Err(Error::shape(
                OP,
                format!(
                    "mask of shape {:?} does not broadcast to the tensor's shape {:?}",
                    mask.dims(),
                    self.dims()
                ),
            ));
        }
        let fill = Tensor::full(&[], value, self.device())?;
        mask.where_cond(&fill, self)
    }

    /// The lower triangle of the last two axes: elements with `col - row <= diagonal` are kept,
    /// the others zeroed, as `torch.tril`.
    pub fn tril(&self, diagonal: i64) -> Result<Tensor> {
        self.triangle("tril", diagonal, true)
    }

    /// The upper triangle of the last two axes: elements with `col - row >= diagonal` are kept,
    /// the others zeroed, as `torch.triu`.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::ones(&[2, 3], &dev)?;
    /// assert_eq!(x.triu(1)?.to_vec()?, vec![0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn triu(&self, diagonal: i64) -> Result<Tensor> {
        self.triangle("triu", diagonal, false)
    }

    fn triangle(&self, op: &'static str, diagonal: i64, lower: bool) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::shape(
                op,
                format!("needs rank 2 or more, got shape {:?}", self.dims()),
            ));
        }
        let (rows, cols) = (self.dims()[self.rank() - 2], self.dims()[self.rank() - 1]);
        let mask: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let d = (i % cols) as i64 - (i / cols) as i64;
                let keep = if lower { d <= diagonal } else { d >= diagonal };
                f32::from(u8::from(!keep))
            })
            .collect();
        let mask = Tensor::from_slice(&mask, &[rows, cols], self.device())?;
        self.masked_fill(&mask, 0.0)
    }

    /// Views of `size` elements along `axis` (the last one shorter when `size` does not divide
    /// the axis), as `torch.split` with an integer size. No copy.
    pub fn split(&self, size: usize, axis: isize) -> Result<Vec<Tensor>> {
        const OP: &str = "split";
        let a = normalize_axis(OP, axis, self.rank())?;
        if size == 0 {
            return Err(Error::invalid(OP, "split size must be positive"));
        }
        let len = self.dims()[a];
        (0..len.div_ceil(size).max(1))
            .map(|k| {
                let start = k * size;
                self.narrow(a as isize, start, size.min(len - start))
            })
            .collect()
    }

    /// `chunks` views along `axis` of `ceil(len / chunks)` elements each (fewer when they run
    /// out), as `torch.chunk`. No copy.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::arange(0.0, 5.0, 1.0, &dev)?;
    /// let parts = x.chunk(2, 0)?;
    /// assert_eq!(parts[0].to_vec()?, vec![0.0, 1.0, 2.0]);
    /// assert_eq!(parts[1].to_vec()?, vec![3.0, 4.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn chunk(&self, chunks: usize, axis: isize) -> Result<Vec<Tensor>> {
        const OP: &str = "chunk";
        let a = normalize_axis(OP, axis, self.rank())?;
        if chunks == 0 {
            return Err(Error::invalid(OP, "the number of chunks must be positive"));
        }
        self.split(self.dims()[a].div_ceil(chunks).max(1), axis)
    }

    /// log(sum(exp(x))) over `axes` (all when empty), computed stably (the maximum is taken
    /// out first), as `torch.logsumexp`. A slice of only -inf gives -inf.
    pub fn logsumexp(&self, axes: &[isize], keepdim: bool) -> Result<Tensor> {
        let m = crate::no_grad(|| self.detach().max(axes, true))?;
        // Rows that are all -inf (or hold +inf) would give inf - inf: shift them by 0.
        let finite = m.abs()?.lt_scalar(f32::INFINITY)?;
        let m = finite.where_cond(&m, &Tensor::zeros(&[], self.device())?)?;
        let out = self.sub(&m)?.exp()?.sum(axes, true)?.log()?.add(&m)?;
        if keepdim {
            return Ok(out);
        }
        let axes = normalize_axes("logsumexp", axes, self.rank())?;
        let shape: Vec<usize> = (0..self.rank())
            .filter(|a| !axes.contains(a))
            .map(|a| self.dims()[a])
            .collect();
        out.reshape_to(&shape)
    }

    /// The elements in reverse order along each of `axes`, as `torch.flip`.
    pub fn flip(&self, axes: &[isize]) -> Result<Tensor> {
        const OP: &str = "flip";
        if axes.is_empty() {
            return Err(Error::invalid(OP, "no axes to flip"));
        }
        let axes = normalize_axes(OP, axes, self.rank())?;
        let mut out = self.clone();
        for a in axes {
            let n = self.dims()[a];
            if n < 2 {
                continue;
            }
            let rev: Vec<f32> = (0..n).rev().map(|i| i as f32).collect();
            let idx = Tensor::from_slice(&rev, &[n], self.device())?;
            out = out.index_select(a as isize, &idx)?;
        }
        Ok(out)
    }

    /// The tensor tiled `reps[i]` times along axis i, as `torch.Tensor.repeat`; extra leading
    /// `reps` add axes.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::from_slice(&[1.0, 2.0], &[2], &dev)?;
    /// assert_eq!(x.repeat(&[2, 2])?.to_vec()?, vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn repeat(&self, reps: &[usize]) -> Result<Tensor> {
        const OP: &str = "repeat";
        if reps.len() < self.rank() {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} repeats for a tensor of rank {}: give at least one per axis",
                    reps.len(),
                    self.rank()
                ),
            ));
        }
        let lead = reps.len() - self.rank();
        let dims: Vec<usize> = std::iter::repeat_n(1, lead)
            .chain(self.dims().iter().copied())
            .collect();
        // (d0, d1, ...) -> (1, d0, 1, d1, ...) -> (r0, d0, r1, d1, ...) -> (r0 d0, r1 d1, ...)
        let split: Vec<usize> = dims.iter().flat_map(|&d| [1, d]).collect();
        let expanded: Vec<usize> = reps.iter().zip(&dims).flat_map(|(&r, &d)| [r, d]).collect();
        let out: Vec<usize> = reps
            .iter()
            .zip(&dims)
            .map(|(&r, &d)| {
                r.checked_mul(d)
                    .ok_or_else(|| Error::invalid(OP, format!("{r} x {d} elements overflow")))
            })
            .collect::<Result<_>>()?;
        self.reshape_to(&split)?
            .expand(&expanded)?
            .contiguous()?
            .reshape_to(&out)
    }

    /// One-hot rows of `classes` for class indices (f32 holding integers) of any shape: the
    /// result has shape `(*self.shape, classes)`, as `torch.nn.functional.one_hot`. An index
    /// outside `0..classes` or a fractional one makes the next readback an `Err` (the indices
    /// stay on the GPU).
    pub fn one_hot(&self, classes: usize) -> Result<Tensor> {
        const OP: &str = "one_hot";
        if classes == 0 {
            return Err(Error::invalid(OP, "needs at least one class"));
        }
        let eye: Vec<f32> = (0..classes * classes)
            .map(|i| f32::from(u8::from(i % (classes + 1) == 0)))
            .collect();
        let eye = Tensor::from_slice(&eye, &[classes, classes], self.device())?;
        let mut shape = self.shape();
        shape.push(classes);
        crate::no_grad(|| eye.index_select(0, &self.detach().reshape(&[-1])?))?.reshape_to(&shape)
    }

    /// Constant padding, as `torch.nn.functional.pad(x, pads, value=value)`: `pads` holds
    /// (before, after) pairs for the last axis first, then the one before it, and so on.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::ones(&[1, 2], &dev)?;
    /// let y = x.pad(&[1, 0, 0, 1], 0.0)?; // one column before, one row after
    /// assert_eq!(y.dims(), &[2, 3]);
    /// assert_eq!(y.to_vec()?, vec![0.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn pad(&self, pads: &[usize], value: f32) -> Result<Tensor> {
        const OP: &str = "pad";
        if !pads.len().is_multiple_of(2) || pads.len() / 2 > self.rank() {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} padding sizes for a tensor of rank {}: give (before, after) pairs for at most every axis",
                    pads.len(),
                    self.rank()
                ),
            ));
        }
        let mut out = self.clone();
        for (k, pair) in pads.chunks(2).enumerate() {
            let axis = self.rank() - 1 - k;
            let mut parts = Vec::with_capacity(3);
            for (i, &n) in pair.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let mut shape = out.shape();
                shape[axis] = n;
                parts.push((i, Tensor::full(&shape, value, self.device())?));
            }
            if parts.is_empty() {
                continue;
            }
            let before = parts.iter().find(|(i, _)| *i == 0).map(|(_, t)| t);
            let after = parts.iter().find(|(i, _)| *i == 1).map(|(_, t)| t);
            let list: Vec<&Tensor> = before
                .into_iter()
                .chain(std::iter::once(&out))
                .chain(after)
                .collect();
            out = Tensor::concat(&list, axis as isize)?;
        }
        Ok(out)
    }

    /// Running sums along `axis`, as `torch.cumsum`: element i is the sum of elements 0..=i.
    /// Computed in ceil(log2 n) shifted additions (a Hillis-Steele scan).
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[4], &dev)?;
    /// assert_eq!(x.cumsum(0)?.to_vec()?, vec![1.0, 3.0, 6.0, 10.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn cumsum(&self, axis: isize) -> Result<Tensor> {
        let a = normalize_axis("cumsum", axis, self.rank())?;
        let n = self.dims()[a];
        let mut out = self.clone();
        let mut shift = 1;
        while shift < n {
            let mut pads = vec![0; 2 * (self.rank() - a)];
            let k = 2 * (self.rank() - 1 - a);
            pads[k] = shift;
            // out[i] += out[i - shift], with zeros before the start.
            let shifted = out.narrow(a as isize, 0, n - shift)?.pad(&pads, 0.0)?;
            out = out.add(&shifted)?;
            shift *= 2;
        }
        Ok(out)
    }

    /// The `k` largest (or, with `largest` false, smallest) elements along `axis`, in order,
    /// and their indices (as f32), as `torch.topk(x, k, axis, largest, sorted=True)`. Ties
    /// keep the first index first. The values carry the gradient; the indices none. Made of
    /// `k` arg-max passes, so it suits the small `k` of classification metrics and beam search.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::from_slice(&[1.0, 5.0, 3.0, 4.0], &[4], &dev)?;
    /// let (values, indices) = x.topk(2, 0, true)?;
    /// assert_eq!(values.to_vec()?, vec![5.0, 4.0]);
    /// assert_eq!(indices.to_vec()?, vec![1.0, 3.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn topk(&self, k: usize, axis: isize, largest: bool) -> Result<(Tensor, Tensor)> {
        const OP: &str = "topk";
        let a = normalize_axis(OP, axis, self.rank())?;
        let n = self.dims()[a];
        if k == 0 || k > n {
            return Err(Error::invalid(
                OP,
                format!("k = {k} must be in 1..={n}, the size of axis {axis}"),
            ));
        }
        // -inf keys become the lowest finite value, so that positions already taken (set to
        // -inf below) always rank below those not yet taken.
        let keys = crate::no_grad(|| {
            let k = if largest {
                self.detach()
            } else {
                self.detach().neg()?
            };
            k.maximum_scalar(-f32::MAX)
        })?;
        // Positions along the axis, shaped to broadcast against the keys.
        let mut shape = vec![1; self.rank()];
        shape[a] = n;
        let positions: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let positions = Tensor::from_slice(&positions, &shape, self.device())?;
        let mut indices = Vec::with_capacity(k);
        let mut keys = keys;
        for _ in 0..k {
            let idx = keys.argmax(a as isize, true)?;
            keys = crate::no_grad(|| keys.masked_fill(&positions.eq(&idx)?, f32::NEG_INFINITY))?;
            indices.push(idx);
        }
        let refs: Vec<&Tensor> = indices.iter().collect();
        let indices = Tensor::concat(&refs, a as isize)?;
        Ok((self.gather(a as isize, &indices)?, indices))
    }

    /// Nearest-neighbour upsampling of `(N, C, H, W)` (or `(C, H, W)`) to `size`, as
    /// `torch.nn.functional.interpolate(mode='nearest')`: output row i reads input row
    /// floor(i * H / out_h).
    pub fn upsample_nearest2d(&self, size: [usize; 2]) -> Result<Tensor> {
        const OP: &str = "upsample_nearest2d";
        let (h, w) = self.spatial(OP, size)?;
        let index = |out: usize, len: usize| -> Vec<f32> {
            (0..out).map(|i| ((i * len) / out) as f32).collect()
        };
        let rows = Tensor::from_slice(&index(size[0], h), &[size[0]], self.device())?;
        let cols = Tensor::from_slice(&index(size[1], w), &[size[1]], self.device())?;
        self.index_select(-2, &rows)?.index_select(-1, &cols)
    }

    /// Bilinear upsampling (or downsampling) of `(N, C, H, W)` (or `(C, H, W)`) to `size`, as
    /// `torch.nn.functional.interpolate(mode='bilinear', align_corners=...)`, written as two
    /// matrix products with the interpolation weights: `A_h x A_w^T`.
    pub fn upsample_bilinear2d(&self, size: [usize; 2], align_corners: bool) -> Result<Tensor> {
        const OP: &str = "upsample_bilinear2d";
        let (h, w) = self.spatial(OP, size)?;
        let weights = |out: usize, len: usize| -> Vec<f32> {
            let mut m = vec![0f32; out * len];
            for i in 0..out {
                let src = if align_corners {
                    if out > 1 {
                        i as f64 * (len - 1) as f64 / (out - 1) as f64
                    } else {
                        0.0
                    }
                } else {
                    ((i as f64 + 0.5) * len as f64 / out as f64 - 0.5).max(0.0)
                };
                let lo = (src.floor() as usize).min(len - 1);
                let hi = (lo + 1).min(len - 1);
                let frac = (src - lo as f64) as f32;
                m[i * len + lo] += 1.0 - frac;
                m[i * len + hi] += frac;
            }
            m
        };
        let ah = Tensor::from_slice(&weights(size[0], h), &[size[0], h], self.device())?;
        let aw = Tensor::from_slice(&weights(size[1], w), &[size[1], w], self.device())?;
        ah.matmul(self)?.matmul(&aw.t()?)
    }

    /// Checks a `(N, C, H, W)` or `(C, H, W)` input and an output size; returns (H, W).
    fn spatial(&self, op: &'static str, size: [usize; 2]) -> Result<(usize, usize)> {
        if !(3..=4).contains(&self.rank()) {
            return Err(Error::shape(
                op,
                format!(
                    "needs (N, C, H, W) or (C, H, W), got shape {:?}",
                    self.dims()
                ),
            ));
        }
        let (h, w) = (self.dims()[self.rank() - 2], self.dims()[self.rank() - 1]);
        if h == 0 || w == 0 || size.contains(&0) {
            return Err(Error::invalid(
                op,
                format!(
                    "input {h}x{w} and output {}x{} must be non-empty",
                    size[0], size[1]
                ),
            ));
        }
        Ok((h, w))
    }
}
