//! Joining and indexing: concat, stack, index_select, gather.

use super::elementwise::{copy_into, launch, Extra};
use crate::autograd::{record, Op};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::shape::{normalize_axis, Layout, MAX_RANK};
use crate::tensor::Tensor;

impl Tensor {
    /// Tensors joined along an existing `axis`; all other sizes must agree.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let a = kiln::Tensor::ones(&[2, 1], &dev)?;
    /// let b = kiln::Tensor::zeros(&[2, 3], &dev)?;
    /// assert_eq!(kiln::Tensor::concat(&[&a, &b], 1)?.dims(), &[2, 4]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn concat(tensors: &[&Tensor], axis: isize) -> Result<Tensor> {
        crate::infer::capture::traced(
            tensors,
            |_| crate::infer::graph::OpKind::Concat { axis },
            || {
                const OP: &str = "concat";
                let first = tensors
                    .first()
                    .ok_or_else(|| Error::invalid(OP, "needs at least one tensor"))?;
                let ax = normalize_axis(OP, axis, first.rank())?;
                let mut total = 0usize;
                for t in tensors {
                    first.check_device(OP, t)?;
                    let same = t.rank() == first.rank()
                        && t.dims()
                            .iter()
                            .zip(first.dims())
                            .enumerate()
                            .all(|(i, (a, b))| i == ax || a == b);
                    if !same {
                        return Err(Error::shape(
                            OP,
                            format!(
                                "shape {:?} does not match {:?} outside axis {ax}",
                                t.dims(),
                                first.dims()
                            ),
                        ));
                    }
                    total += t.dims()[ax];
                }
                let mut shape = first.shape();
                shape[ax] = total;
                let out = Tensor::uninit(OP, &shape, first.device())?;
                let mut start = 0;
                for t in tensors {
                    let len = t.dims()[ax];
                    let region = out.layout.narrow(OP, ax, start, len)?;
                    copy_into(t, &out, &region)?;
                    start += len;
                }
                let sizes = tensors.iter().map(|t| t.dims()[ax]).collect();
                Ok(record(out, tensors, |_| Op::Concat { axis: ax, sizes }))
            },
        )
    }

    /// Tensors of one shape joined along a new `axis`.
    pub fn stack(tensors: &[&Tensor], axis: isize) -> Result<Tensor> {
        const OP: &str = "stack";
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid(OP, "needs at least one tensor"))?;
        if first.rank() >= MAX_RANK {
            return Err(Error::shape(OP, format!("rank would exceed {MAX_RANK}")));
        }
        let ax = normalize_axis(OP, axis, first.rank() + 1)?;
        let mut views = Vec::with_capacity(tensors.len());
        for t in tensors {
            if t.dims() != first.dims() {
                return Err(Error::shape(
                    OP,
                    format!("shape {:?} differs from {:?}", t.dims(), first.dims()),
                ));
            }
            views.push(t.unsqueeze(ax as isize)?);
        }
        let refs: Vec<&Tensor> = views.iter().collect();
        Tensor::concat(&refs, ax as isize)
    }

    /// Slices of `axis` picked by `indices` (a 1-D i32 tensor, or f32 holding integers, as for
    /// embeddings). The indices stay on the GPU: one that is fractional or out of range gives
    /// zeros there and makes the device's next readback an `Err` naming it (as a CUDA
    /// device-side assert would). [`Tensor::index_select_slice`] checks host indices at once.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let table = kiln::Tensor::arange(0.0, 6.0, 1.0, &dev)?.reshape(&[3, 2])?;
    /// let idx = kiln::Tensor::from_slice(&[2.0, 0.0], &[2], &dev)?;
    /// assert_eq!(table.index_select(0, &idx)?.to_vec()?, vec![4.0, 5.0, 0.0, 1.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn index_select(&self, axis: isize, indices: &Tensor) -> Result<Tensor> {
        let len = self.dim(axis)?;
        let indices = &indices.as_f32_indices("index_select", len)?;
        crate::infer::capture::traced(
            &[self, indices],
            |_| crate::infer::graph::OpKind::IndexSelect { axis },
            || {
                const OP: &str = "index_select";
                self.check_device(OP, indices)?;
                let ax = normalize_axis(OP, axis, self.rank())?;
                if indices.rank() != 1 {
                    return Err(Error::shape(
                        OP,
                        format!("indices must be 1-D, got shape {:?}", indices.dims()),
                    ));
                }
                let mut shape = self.shape();
                shape[ax] = indices.numel();
                // The index of output position (.., j, ..) is indices[j]: a view of the indices with
                // stride 0 on every other axis.
                let mut il = Layout {
                    shape: shape.clone(),
                    strides: vec![0; shape.len()],
                    offset: indices.layout.offset,
                };
                il.strides[ax] = indices.strides()[0];
                gather_into(OP, self, ax, indices, &il, &shape)
            },
        )
    }

    /// [`Tensor::index_select`] with indices from the host, checked against the axis size.
    pub fn index_select_slice(&self, axis: isize, indices: &[usize]) -> Result<Tensor> {
        const OP: &str = "index_select";
        let ax = normalize_axis(OP, axis, self.rank())?;
        let size = self.dims()[ax];
        if let Some(&bad) = indices.iter().find(|&&i| i >= size) {
            return Err(Error::invalid(
                OP,
                format!("index {bad} is out of range for axis {ax} of size {size}"),
            ));
        }
        if size > 1 << 24 {
            return Err(Error::invalid(
                OP,
                format!("axis of size {size} exceeds the f32-exact index range"),
            ));
        }
        let idx: Vec<f32> = indices.iter().map(|&i| i as f32).collect();
        let t = Tensor::from_slice(&idx, &[idx.len()], self.device())?;
        self.index_select(axis, &t)
    }

    /// `out[i][j][k] = self[index[i][j][k]][j][k]` for `axis = 0` (and likewise for other axes),
    /// as `torch.gather`: `index` has the rank of `self` and no larger size on the other axes.
    /// A fractional or out-of-range index makes the next readback an `Err`, as for
    /// [`Tensor::index_select`].
    pub fn gather(&self, axis: isize, index: &Tensor) -> Result<Tensor> {
        let len = self.dim(axis)?;
        let index = &index.as_f32_indices("gather", len)?;
        crate::infer::capture::traced(
            &[self, index],
            |_| crate::infer::graph::OpKind::Gather { axis },
            || {
                const OP: &str = "gather";
                self.check_device(OP, index)?;
                let ax = normalize_axis(OP, axis, self.rank())?;
                let fits = index.rank() == self.rank()
                    && index
                        .dims()
                        .iter()
                        .zip(self.dims())
                        .enumerate()
                        .all(|(i, (a, b))| i == ax || a <= b);
                if !fits {
                    return Err(Error::shape(
                        OP,
                        format!(
                            "index shape {:?} does not fit input shape {:?} on axis {ax}",
                            index.dims(),
                            self.dims()
                        ),
                    ));
                }
                let shape = index.shape();
                gather_into(OP, self, ax, index, &index.layout.clone(), &shape)
            },
        )
    }
}

fn gather_into(
    op: &'static str,
    src: &Tensor,
    ax: usize,
    idx: &Tensor,
    idx_layout: &Layout,
    shape: &[usize],
) -> Result<Tensor> {
    let out = Tensor::uninit(op, shape, src.device())?;
    let mut sl = src.layout.clone();
    sl.shape = shape.to_vec();
    sl.strides[ax] = 0;
    let extra = Extra {
        aux: [src.dims()[ax] as u32, src.strides()[ax] as u32],
        ..Default::default()
    };
    launch(
        Kernel::GatherFwd,
        &[(src, &sl), (idx, idx_layout)],
        &out,
        &out.layout.clone(),
        extra,
    );
    Ok(record(out, &[src], |_| Op::Gather {
        axis: ax,
        index: idx.detach(),
        index_layout: idx_layout.clone(),
        in_shape: src.shape(),
    }))
}

/// Gradient of `gather`: `g` (the output's shape) summed into the positions the index picked,
/// in a tensor of `in_shape` (`gather_bwd`, no atomics, deterministic).
pub(crate) fn gather_backward(
    g: &Tensor,
    index: &Tensor,
    index_layout: &Layout,
    axis: usize,
    in_shape: &[usize],
) -> Result<Tensor> {
    const OP: &str = "gather_backward";
    let mut shape = g.shape();
    let k = shape[axis];
    shape[axis] = in_shape[axis];
    let out = Tensor::uninit(OP, &shape, g.device())?;
    let mut gl = g.layout.clone();
    gl.shape = shape.clone();
    gl.strides[axis] = 0;
    let mut il = index_layout.clone();
    il.shape = shape.clone();
    il.strides[axis] = 0;
    let extra = Extra {
        op: axis as u32,
        aux: [k as u32, g.strides()[axis] as u32],
        aux2: index_layout.strides[axis] as u32,
        ..Default::default()
    };
    launch(
        Kernel::GatherBwd,
        &[(g, &gl), (index, &il)],
        &out,
        &out.layout.clone(),
        extra,
    );
    if shape == in_shape {
        return Ok(out);
    }
    // The index was smaller than the input on other axes: place the result in zeros.
    let full = Tensor::zeros(in_shape, g.device())?;
    let region = Layout {
        shape,
        strides: full.strides().to_vec(),
        offset: 0,
    };
    copy_into(&out, &full, &region)?;
    Ok(full)
}
