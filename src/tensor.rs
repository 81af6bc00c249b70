//! The `Tensor` type: GPU storage plus a layout. Views share storage; ops live in `ops/`.

use std::fmt;
use std::sync::Arc;

use crate::autograd::{record, Node, Op};
use crate::device::{BufferKind, Device};
use crate::error::{Error, Result};
use crate::shape::{checked_numel, normalize_axis, resolve_shape, Layout, MAX_RANK};

/// A GPU buffer owned by one or more tensors; returned to the device's pool on drop.
pub(crate) struct Storage {
    /// Increasing with each allocation: capture tells weights from tensors it saw made.
    pub(crate) id: u64,
    /// The element type of the buffer.
    pub(crate) dtype: DType,
    /// Counts in-place writes (assign, optimizer steps), so that backward can tell that a
    /// tensor it saved has changed since the forward.
    pub(crate) version: std::sync::atomic::AtomicU64,
    /// A tensor made from this storage's data at a version, read through a layout: the one
    /// use so far is a convolution weight padded for the im2col product
    /// (`ops::conv::gemm_weight`), kept so that a weight that does not change (a frozen
    /// model's) is padded once, not at every call.
    derived: std::sync::Mutex<Option<(u64, Layout, Tensor)>>,
    buffer: wgpu::Buffer,
    class: u64,
    device: Device,
}

static NEXT_STORAGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The element type of a tensor. Ops compute in f32; i32 tensors hold indices and class
/// targets, and [`Tensor::to_dtype`] casts explicitly. More types (f16 outside frozen models,
/// i8 and u8 for quantization) are to come, hence `non_exhaustive`.
///
/// ```
/// use kiln::{DType, Tensor};
/// # let dev = kiln::Device::default_device()?;
/// let ids = Tensor::from_slice_i32(&[3, 0, 2], &[3], &dev)?;
/// assert_eq!(kiln::infer::DType::I32, DType::I32); // one type for tensors and frozen graphs
/// assert_eq!(ids.dtype(), DType::I32);
/// assert_eq!(ids.to_dtype(DType::F32)?.to_vec()?, vec![3.0, 0.0, 2.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float, the type every op computes in.
    #[default]
    F32,
    /// 16-bit float in memory: the weights and activations of f16 frozen models
    /// ([`crate::infer::InferenceModel::to_half`]), computed in f32 inside the kernels.
    F16,
    /// 32-bit signed integer: indices and class targets.
    I32,
}

impl DType {
    /// The name, as in files and errors.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I32 => "i32",
        }
    }

    /// Bytes of storage for `numel` elements (storage comes in 4-byte words).
    pub(crate) fn storage_bytes(self, numel: usize) -> u64 {
        match self {
            DType::F16 => numel.div_ceil(2).max(1) as u64 * 4,
            DType::F32 | DType::I32 => numel.max(1) as u64 * 4,
        }
    }
}

/// The id the next storage will get.
pub(crate) fn next_storage_id() -> u64 {
    NEXT_STORAGE.load(std::sync::atomic::Ordering::Relaxed)
}

impl Storage {
    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Tensor {
    /// How many in-place writes the storage has had.
    pub(crate) fn version(&self) -> u64 {
        self.storage
            .version
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The tensor [`Tensor::set_derived`] kept for this data read through this layout, if the
    /// data has not changed since (an in-place write bumps the version).
    pub(crate) fn derived(&self) -> Option<Tensor> {
        let slot = self
            .storage
            .derived
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slot.as_ref()
            .filter(|(v, l, _)| *v == self.version() && *l == self.layout)
            .map(|(_, _, t)| t.clone())
    }

    /// Keeps `t`, made from this tensor's data at `version` (read before `t` was recorded, so
    /// that a write in between leaves it stale rather than wrongly current), for
    /// [`Tensor::derived`]. `t` has storage of its own (a view of this one would never be
    /// freed).
    pub(crate) fn set_derived(&self, version: u64, t: &Tensor) {
        debug_assert!(!Arc::ptr_eq(&t.storage, &self.storage));
        let mut slot = self
            .storage
            .derived
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *slot = Some((version, self.layout.clone(), t.detach()));
    }

    /// Records an in-place write to the storage.
    pub(crate) fn bump_version(&self) {
        self.storage
            .version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        // wgpu buffers are reference-counted handles: the pool keeps this one alive.
        self.device
            .release(BufferKind::Storage, self.class, self.buffer.clone());
    }
}

/// An n-dimensional array of `f32` on a GPU.
///
/// Cloning is cheap and shares the data. Views (`reshape` of contiguous data, `permute`,
/// `transpose`, `expand`, `narrow`, `squeeze`, `unsqueeze`) share storage too; ops read
/// through strides, and [`Tensor::contiguous`] copies only when needed. Operations record GPU
/// work lazily; reading data ([`Tensor::to_vec`]) submits it.
///
/// ```
/// use kiln::{Device, Tensor};
/// let dev = Device::default_device()?;
/// let a = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &dev)?;
/// let b = a.transpose(0, 1)?.matmul(&a)?; // (3, 2) x (2, 3)
/// assert_eq!(b.dims(), &[3, 3]);
/// assert_eq!(a.sum_all()?.to_scalar()?, 21.0);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor {
    pub(crate) storage: Arc<Storage>,
    pub(crate) layout: Layout,
    /// The autograd node: `Some` when this tensor requires grad.
    pub(crate) node: Option<Arc<Node>>,
}

impl Tensor {
    /// A new contiguous tensor whose contents are about to be written by a kernel.
    pub(crate) fn uninit(op: &'static str, shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::alloc(op, shape, device, false)
    }

    /// A new contiguous tensor filled from the host.
    pub(crate) fn alloc(
        op: &'static str,
        shape: &[usize],
        device: &Device,
        for_upload: bool,
    ) -> Result<Tensor> {
        Self::alloc_typed(op, shape, DType::F32, device, for_upload)
    }

    /// [`Tensor::alloc`] of another element type (4 bytes each).
    pub(crate) fn alloc_typed(
        op: &'static str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
        for_upload: bool,
    ) -> Result<Tensor> {
        if shape.len() > MAX_RANK {
            return Err(Error::shape(
                op,
                format!(
                    "rank {} exceeds the maximum of {MAX_RANK} (shape {shape:?})",
                    shape.len()
                ),
            ));
        }
        let numel = checked_numel(shape).ok_or(Error::TooLarge {
            op,
            bytes: u128::MAX,
            limit: device.max_binding_bytes(),
        })?;
        let bytes = (numel as u128) * 4;
        let limit = device.max_binding_bytes();
        if bytes > limit as u128 || numel > u32::MAX as usize {
            return Err(Error::TooLarge { op, bytes, limit });
        }
        let (buffer, class) = device.alloc(op, bytes as u64, BufferKind::Storage, for_upload)?;
        Ok(Tensor {
            storage: Arc::new(Storage {
                id: NEXT_STORAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                dtype,
                version: std::sync::atomic::AtomicU64::new(0),
                derived: std::sync::Mutex::new(None),
                buffer,
                class,
                device: device.clone(),
            }),
            layout: Layout::contiguous(shape),
            node: None,
        })
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.storage.buffer()
    }

    /// The same storage seen through another layout, without a graph node.
    pub(crate) fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor {
            storage: self.storage.clone(),
            layout,
            node: None,
        }
    }

    /// A view with `layout`, recorded for autograd as `op`.
    fn view(&self, layout: Layout, op: impl FnOnce() -> Op) -> Tensor {
        record(self.with_layout(layout), &[self], |_| op())
    }

    /// The shape.
    pub fn dims(&self) -> &[usize] {
        &self.layout.shape
    }

    /// The shape as an owned vector.
    pub fn shape(&self) -> Vec<usize> {
        self.layout.shape.clone()
    }

    /// Strides in elements (0 on broadcast axes).
    pub fn strides(&self) -> &[usize] {
        &self.layout.strides
    }

    /// Where the first element sits in the storage, in elements.
    pub fn storage_offset(&self) -> usize {
        self.layout.offset
    }

    /// The layout (shape, strides, offset).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }

    /// Size of `axis` (negative counts from the end).
    pub fn dim(&self, axis: isize) -> Result<usize> {
        Ok(self.layout.shape[normalize_axis("dim", axis, self.rank())?])
    }

    /// True when the elements are dense and row-major.
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// The device holding the data.
    pub fn device(&self) -> &Device {
        &self.storage.device
    }

    /// True when both tensors view the same storage.
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype
    }

    /// `Err` unless the tensor holds f32: ops compute in f32, and an i32 tensor must be cast
    /// with [`Tensor::to_dtype`] first (the index ops and losses take i32 indices as they are).
    pub(crate) fn check_float(&self, op: &'static str) -> Result<()> {
        match self.dtype() {
            DType::F32 => Ok(()),
            other => Err(Error::invalid(
                op,
                format!(
                    "got a {other:?} tensor of shape {:?}; ops compute in f32: cast it with to_dtype(DType::F32)",
                    self.dims()
                ),
            )),
        }
    }

    pub(crate) fn check_device(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.device().same(other.device()) {
            Ok(())
        } else {
            Err(Error::DeviceMismatch {
                op,
                a: format!("{:?}", self.device()),
                b: format!("{:?}", other.device()),
            })
        }
    }

    // ---- views ----

    /// The same elements in another shape; one size may be `-1`. A view when the data is
    /// contiguous, a copy otherwise.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::arange(0.0, 12.0, 1.0, &dev)?.reshape(&[3, -1])?;
    /// assert_eq!(t.dims(), &[3, 4]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn reshape(&self, shape: &[isize]) -> Result<Tensor> {
        crate::infer::capture::traced_view(&[self], crate::infer::graph::reshape_node, || {
            let shape = resolve_shape("reshape", shape, self.numel())?;
            if shape.len() > MAX_RANK {
                return Err(Error::shape(
                    "reshape",
                    format!("rank {} exceeds {MAX_RANK}", shape.len()),
                ));
            }
            let base = if self.is_contiguous() {
                self.clone()
            } else {
                self.contiguous()?
            };
            let mut layout = Layout::contiguous(&shape);
            layout.offset = base.layout.offset;
            let in_shape = self.shape();
            Ok(base.view(layout, || Op::Reshape { in_shape }))
        })
    }

    /// `reshape` with a shape of `usize`.
    pub fn reshape_to(&self, shape: &[usize]) -> Result<Tensor> {
        let s: Vec<isize> = shape.iter().map(|&d| d as isize).collect();
        self.reshape(&s)
    }

    /// All axes flattened into one.
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape(&[-1])
    }

    /// Axes `start..=end` merged into one.
    pub fn flatten(&self, start: isize, end: isize) -> Result<Tensor> {
        let rank = self.rank().max(1);
        let s = normalize_axis("flatten", start, rank)?;
        let e = normalize_axis("flatten", end, rank)?;
        if s > e || self.rank() == 0 {
            return if self.rank() == 0 {
                self.reshape(&[1])
            } else {
                Err(Error::invalid(
                    "flatten",
                    format!("start {start} is after end {end}"),
                ))
            };
        }
        let dims = self.dims();
        let mut shape: Vec<isize> = dims[..s].iter().map(|&d| d as isize).collect();
        shape.push(dims[s..=e].iter().product::<usize>() as isize);
        shape.extend(dims[e + 1..].iter().map(|&d| d as isize));
        self.reshape(&shape)
    }

    /// Axes reordered: axis `i` of the result is axis `perm[i]` of `self`. A view.
    pub fn permute(&self, perm: &[isize]) -> Result<Tensor> {
        crate::infer::capture::traced_view(
            &[self],
            |_| crate::infer::graph::permute_node(perm, self.rank()),
            || {
                let perm: Vec<usize> = perm
                    .iter()
                    .map(|&a| normalize_axis("permute", a, self.rank()))
                    .collect::<Result<_>>()?;
                let layout = self.layout.permute("permute", &perm)?;
                Ok(self.view(layout, || Op::Permute { perm }))
            },
        )
    }

    /// Two axes swapped. A view.
    pub fn transpose(&self, a: isize, b: isize) -> Result<Tensor> {
        crate::infer::capture::traced_view(
            &[self],
            |_| crate::infer::graph::transpose_node(a, b, self.rank()),
            || {
                let a = normalize_axis("transpose", a, self.rank())?;
                let b = normalize_axis("transpose", b, self.rank())?;
                let mut perm: Vec<usize> = (0..self.rank()).collect();
                perm.swap(a, b);
                let layout = self.layout.permute("transpose", &perm)?;
                Ok(self.view(layout, || Op::Permute { perm }))
            },
        )
    }

    /// The last two axes swapped (a matrix transpose). A view.
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::shape(
                "t",
                format!("needs rank 2 or more, got shape {:?}", self.dims()),
            ));
        }
        self.transpose(-2, -1)
    }

    /// Broadcast to `shape` (NumPy rules) without copying.
    pub fn expand(&self, shape: &[usize]) -> Result<Tensor> {
        crate::infer::capture::traced_view(&[self], crate::infer::graph::expand_node, || {
            let layout = self.layout.broadcast_to("expand", shape)?;
            let in_shape = self.shape();
            Ok(self.view(layout, || Op::Expand { in_shape }))
        })
    }

    /// `len` elements of `axis` starting at `start`. A view.
    pub fn narrow(&self, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        crate::infer::capture::traced_view(
            &[self],
            |_| crate::infer::graph::narrow_node(axis, start, len, self.rank()),
            || {
                let a = normalize_axis("narrow", axis, self.rank())?;
                let layout = self.layout.narrow("narrow", a, start, len)?;
                let in_shape = self.shape();
                Ok(self.view(layout, || Op::Narrow {
                    axis: a,
                    start,
                    in_shape,
                }))
            },
        )
    }

    /// Axes of size one removed (all of them with `None`). A view.
    pub fn squeeze(&self, axis: Option<isize>) -> Result<Tensor> {
        crate::infer::capture::traced_view(&[self], crate::infer::graph::reshape_node, || {
            let layout = match axis {
                None => self.layout.squeeze(None),
                Some(a) => self
                    .layout
                    .squeeze(Some(&[normalize_axis("squeeze", a, self.rank())?])),
            };
            let in_shape = self.shape();
            Ok(self.view(layout, || Op::Reshape { in_shape }))
        })
    }

    /// An axis of size one inserted at `axis` (`-1` appends). A view.
    pub fn unsqueeze(&self, axis: isize) -> Result<Tensor> {
        crate::infer::capture::traced_view(&[self], crate::infer::graph::reshape_node, || {
            if self.rank() >= MAX_RANK {
                return Err(Error::shape(
                    "unsqueeze",
                    format!("rank would exceed {MAX_RANK}"),
                ));
            }
            let a = normalize_axis("unsqueeze", axis, self.rank() + 1)?;
            let in_shape = self.shape();
            Ok(self.view(self.layout.unsqueeze(a), || Op::Reshape { in_shape }))
        })
    }

    /// A tensor with the same values in contiguous row-major storage (itself when already so).
    pub fn contiguous(&self) -> Result<Tensor> {
        self.copied_unless(self.is_contiguous())
    }

    /// The tensor contiguous and starting at element 0 of its storage (a copy otherwise):
    /// what kernels that index their buffers from the start need.
    pub(crate) fn dense(&self) -> Result<Tensor> {
        self.copied_unless(self.is_contiguous() && self.layout.offset == 0)
    }

    /// The tensor itself when `keep`, else a contiguous copy (captured as the same value).
    fn copied_unless(&self, keep: bool) -> Result<Tensor> {
        if keep {
            return Ok(self.clone());
        }
        self.check_float("contiguous")?;
        let out = crate::ops::elementwise::copy(self)?;
        crate::infer::capture::alias(self, &out)?;
        Ok(out)
    }

    // ---- readback ----

    /// The elements in row-major order. Submits pending work and waits for it.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.check_float("to_vec")?;
        crate::infer::capture::readback(self)?;
        if self.numel() == 0 {
            return Ok(Vec::new());
        }
        let t = self.contiguous()?;
        self.device()
            .read_buffer(t.buffer(), t.layout.offset as u64 * 4, t.numel() as u64 * 4)
    }

    /// Starts reading f32 tensors of one device back in one copy (`Device::start_read`):
    /// the GPU runs the pending work while the host goes on; the `PendingRead` returns their
    /// elements one tensor after another.
    pub(crate) fn start_read_f32(
        device: &crate::Device,
        tensors: &[Tensor],
    ) -> Result<crate::device::PendingRead> {
        let mut flat = Vec::with_capacity(tensors.len());
        for t in tensors {
            t.check_float("read")?;
            if !t.device().same(device) {
                return Err(Error::DeviceMismatch {
                    op: "read",
                    a: format!("{device:?}"),
                    b: format!("{:?}", t.device()),
                });
            }
            flat.push(match t.dtype() {
                DType::F32 => t.contiguous()?,
                _ => t.to_dtype(DType::F32)?.contiguous()?,
            });
        }
        let regions: Vec<_> = flat
            .iter()
            .filter(|t| t.numel() > 0)
            .map(|t| (t.buffer(), t.layout.offset as u64 * 4, t.numel() as u64 * 4))
            .collect();
        device.start_read(&regions)
    }

    /// The first `words` 4-byte words of a contiguous tensor's storage from its offset, as
    /// bytes, whatever the element type (for writing files).
    pub(crate) fn read_words(&self, words: usize) -> Result<Vec<u8>> {
        if words == 0 {
            return Ok(Vec::new());
        }
        self.device().read_buffer(
            self.buffer(),
            self.layout.offset as u64 * 4,
            words as u64 * 4,
        )
    }

    /// The value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("needs exactly one element, got shape {:?}", self.dims()),
            ));
        }
        Ok(self.to_vec()?[0])
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor(shape={:?}, strides={:?}, offset={}, requires_grad={}, device={:?})",
            self.dims(),
            self.strides(),
            self.layout.offset,
            self.node.is_some(),
            self.device()
        )
    }
}

/// Shows the shape and up to 6 values per axis (reads the data back from the GPU).
impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const EDGE: usize = 3;
        write!(f, "Tensor{:?} ", self.dims())?;
        let values = match self.dtype() {
            DType::I32 => self
                .to_vec_i32()
                .map(|v| v.into_iter().map(|x| x as f32).collect()),
            _ => self.to_vec(),
        };
        let values = match values {
            Ok(v) => v,
            Err(e) => return write!(f, "<unreadable: {e}>"),
        };
        fn rec(f: &mut fmt::Formatter<'_>, v: &[f32], dims: &[usize]) -> fmt::Result {
            let Some((&n, rest)) = dims.split_first() else {
                return write!(f, "{:.4}", v.first().copied().unwrap_or(f32::NAN));
            };
            let inner: usize = rest.iter().product();
            f.write_str("[")?;
            for i in 0..n {
                if n > 2 * EDGE && i == EDGE {
                    f.write_str(", ...")?;
                    continue;
                }
                if n > 2 * EDGE && i > EDGE && i < n - EDGE {
                    continue;
                }
                if i > 0 {
                    f.write_str(", ")?;
                }
                rec(f, &v[i * inner..(i + 1) * inner], rest)?;
            }
            f.write_str("]")
        }
        rec(f, &values, self.dims())
    }
}
