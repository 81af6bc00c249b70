//! Matrix product with `torch.matmul` semantics: batch broadcasting, vectors promoted to
//! matrices, transposed operands read through strides.

use bytemuck::{Pod, Zeroable};

use super::elementwise::{activation_in_place, UnaryOp};
use super::{pack, Epilogue, EPILOGUE_ACTIVATION_BITS};
use crate::autograd::{record, Op};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, Variant};
use crate::shape::{broadcast_shapes, Layout, MAX_RANK};
use crate::tensor::Tensor;

/// Uniform parameters of `shaders/matmul.wgsl` (its `Params` struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub batch_rank: u32,
    pub off_a: u32,
    pub off_b: u32,
    pub a_rs: u32,
    pub a_cs: u32,
    pub b_rs: u32,
    pub b_cs: u32,
    pub z_base: u32,
    pub epilogue: u32,
    pub act_alpha: f32,
    pub off_bias: u32,
    /// The column chunk of a [`Fold`] (0 without one).
    pub col_split: u32,
    pub _pad: u32,
    pub bshape: [u32; MAX_RANK],
    pub sa: [u32; MAX_RANK],
    pub sb: [u32; MAX_RANK],
}

/// Output tile of one workgroup of `matmul_fwd` (8x8 invocations, 4x4 outputs each).
const TILE: usize = 32;
/// Output tile of one workgroup of `matmul_tiled_fwd` (16x16 invocations, 4x4 outputs each).
const TILED: usize = 64;
/// Output tile of one workgroup of `matmul_tiled128_fwd` (16x16 invocations, 8x8 outputs each).
const TILED128: usize = 128;

/// Output rows of one workgroup of the `matmul_vec4_*` kernels (8 invocations side by side,
/// 16x16 outputs each).
const VEC4_ROWS: usize = 16;
/// Output columns of one workgroup of the `matmul_vec4_*` kernels.
const VEC4_COLS: usize = 128;
/// Output columns of one workgroup of the `matmul_sg32_*` kernels (32 invocations side by
/// side); the `matmul_sg8_*` kernels cover [`VEC4_COLS`].
const SG32_COLS: usize = 512;

/// Output block of one workgroup of the `matmul_coop16_*` kernels (2x2 tiles of 16x16).
const COOP_BLOCK: usize = 32;

/// Output tile (columns, rows) of one workgroup of a matmul kernel.
fn tile_of(kernel: Kernel) -> [usize; 2] {
    match kernel {
        Kernel::MatmulTiledFwd | Kernel::MatmulReg8Fwd => [TILED, TILED],
        Kernel::MatmulTiled128Fwd
        | Kernel::MatmulT128v4NnFwd
        | Kernel::MatmulT128v4NtFwd
        | Kernel::MatmulT128v4TnFwd => [TILED128, TILED128],
        Kernel::MatmulVec4NnFwd
        | Kernel::MatmulVec4NtFwd
        | Kernel::MatmulVec4TnFwd
        | Kernel::MatmulSg8NnFwd
        | Kernel::MatmulSg8NtFwd
        | Kernel::MatmulSg8TnFwd => [VEC4_COLS, VEC4_ROWS],
        Kernel::MatmulSg32NnFwd | Kernel::MatmulSg32NtFwd | Kernel::MatmulSg32TnFwd => {
            [SG32_COLS, VEC4_ROWS]
        }
        Kernel::MatmulCoop16NnFwd | Kernel::MatmulCoop16NtFwd => [COOP_BLOCK, COOP_BLOCK],
        _ => [TILE, TILE],
    }
}

/// Operand layouts with 4-aligned rows, read as vec4s by the `matmul_vec4_*`,
/// `matmul_sg*_*` and `matmul_t128v4_*` kernels (see the header that `build.rs` writes for
/// `matmul_vec4.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Aligned {
    /// a (m, k) and b (k, n) row-major.
    Nn,
    /// b transposed: b^T (n, k) row-major.
    Nt,
    /// a transposed: a^T (k, m) row-major.
    Tn,
}

impl Aligned {
    const ALL: [Aligned; 3] = [Aligned::Nn, Aligned::Nt, Aligned::Tn];

    /// The layout a vec4-reading kernel needs (`None` for other kernels), and whether it
    /// leaves an activation other than relu to a second pass (the `matmul_vec4_*` and
    /// `matmul_sg*_*` kernels).
    pub(crate) fn of_kernel(kernel: Kernel) -> Option<(Aligned, bool)> {
        Aligned::ALL.into_iter().find_map(|l| {
            let split = [l.vec4(), l.sg8(), l.sg32()].contains(&kernel);
            (split || l.t128() == kernel).then_some((l, split))
        })
    }

    /// The layout of these parameters, if aligned. `sa`/`sb` are the batch strides; `bias` says
    /// whether the epilogue reads the bias.
    fn of(p: &MatmulParams, sa: &[usize], sb: &[usize], bias: bool) -> Option<Aligned> {
        let four = |v: usize| v.is_multiple_of(4);
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        // Every layout steps through k four at a time, with no tail.
        let common = k > 0
            && four(k)
            && four(n)
            && four(p.off_a as usize)
            && four(p.off_b as usize)
            && sa.iter().chain(sb).all(|&s| four(s))
            && (!bias || four(p.off_bias as usize))
            && m.div_ceil(VEC4_ROWS) <= MAX_GROUPS;
        let a_rows = p.a_cs == 1 && four(p.a_rs as usize) && four(k);
        let a_cols = p.a_rs == 1 && four(p.a_cs as usize) && four(m);
        let b_rows = p.b_cs == 1 && four(p.b_rs as usize);
        let b_cols = p.b_rs == 1 && four(p.b_cs as usize) && four(k);
        match (common, a_rows, a_cols, b_rows, b_cols) {
            (false, ..) => None,
            (true, true, _, true, _) => Some(Aligned::Nn),
            (true, true, _, _, true) => Some(Aligned::Nt),
            (true, _, true, true, _) => Some(Aligned::Tn),
            _ => None,
        }
    }

    /// The 16x16-per-invocation kernel (an activation other than relu runs as a second pass after it).
    pub(crate) fn vec4(self) -> Kernel {
        match self {
            Aligned::Nn => Kernel::MatmulVec4NnFwd,
            Aligned::Nt => Kernel::MatmulVec4NtFwd,
            Aligned::Tn => Kernel::MatmulVec4TnFwd,
        }
    }

    /// The vec4 kernel with A shared through subgroups, 8 invocations per workgroup.
    pub(crate) fn sg8(self) -> Kernel {
        match self {
            Aligned::Nn => Kernel::MatmulSg8NnFwd,
            Aligned::Nt => Kernel::MatmulSg8NtFwd,
            Aligned::Tn => Kernel::MatmulSg8TnFwd,
        }
    }

    /// The same with 32 invocations per workgroup.
    pub(crate) fn sg32(self) -> Kernel {
        match self {
            Aligned::Nn => Kernel::MatmulSg32NnFwd,
            Aligned::Nt => Kernel::MatmulSg32NtFwd,
            Aligned::Tn => Kernel::MatmulSg32TnFwd,
        }
    }

    /// The double-buffered 128x128-tile kernel.
    pub(crate) fn t128(self) -> Kernel {
        match self {
            Aligned::Nn => Kernel::MatmulT128v4NnFwd,
            Aligned::Nt => Kernel::MatmulT128v4NtFwd,
            Aligned::Tn => Kernel::MatmulT128v4TnFwd,
        }
    }
}

const MAX_GROUPS: usize = 65535;

/// The cooperative-matrix kernel that fits these parameters, if any: f16 operands, k a
/// multiple of 16 (the kernels have no tail), m and n at least 16 (every 16x16 tile the
/// kernels load lies inside the operands), A row-major and B row-major (`_nn_`, n a multiple
/// of 8) or column-major (`_nt_`, as `w^T`), and every tile start a multiple of 8 elements (16
/// bytes): the offsets, strides and batch strides.
fn coop_kernel(p: &MatmulParams, variant: Variant) -> Option<Kernel> {
    let eight = |v: u32| v.is_multiple_of(8);
    let fits = matches!(variant, Variant::F16 | Variant::F16ToF32)
        && p.k.is_multiple_of(16)
        && p.m >= 16
        && p.n >= 16
        && p.a_cs == 1
        && [p.a_rs, p.off_a, p.off_b].into_iter().all(eight)
        && p.sa.iter().chain(&p.sb).all(|&s| eight(s));
    match (p.b_cs, p.b_rs) {
        _ if !fits => None,
        (1, rs) if eight(rs) && eight(p.n) => Some(Kernel::MatmulCoop16NnFwd),
        (cs, 1) if eight(cs) => Some(Kernel::MatmulCoop16NtFwd),
        _ => None,
    }
}

impl Tensor {
    /// Matrix product as `torch.matmul`: `(..., m, k) x (..., k, n) -> (..., m, n)` with the
    /// batch axes broadcast; a 1-D left operand is a row vector and a 1-D right operand a
    /// column vector (their axis is removed from the result). Transposed views need no copy.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let a = kiln::Tensor::randn(&[5, 2, 3], 0, &dev)?; // a batch of 5
    /// let w = kiln::Tensor::randn(&[4, 3], 1, &dev)?;
    /// let y = a.matmul(&w.t()?)?; // w broadcast over the batch, transposed without a copy
    /// assert_eq!(y.dims(), &[5, 2, 4]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[self, other],
            |_| crate::infer::graph::OpKind::Matmul,
            || {
                const OP: &str = "matmul";
                self.check_device(OP, other)?;
                if self.rank() == 0 || other.rank() == 0 {
                    return Err(Error::shape(
                        OP,
                        format!(
                            "both operands need rank 1 or more, got {:?} and {:?}",
                            self.dims(),
                            other.dims()
                        ),
                    ));
                }
                let a = if self.rank() == 1 {
                    self.unsqueeze(0)?
                } else {
                    self.clone()
                };
                let b = if other.rank() == 1 {
                    other.unsqueeze(-1)?
                } else {
                    other.clone()
                };
                let (ra, rb) = (a.rank(), b.rank());
                let (m, k) = (a.dims()[ra - 2], a.dims()[ra - 1]);
                let (k2, n) = (b.dims()[rb - 2], b.dims()[rb - 1]);
                if k != k2 {
                    return Err(Error::shape(
                        OP,
                        format!(
                            "inner sizes differ: {:?} x {:?} ({k} vs {k2})",
                            self.dims(),
                            other.dims()
                        ),
                    ));
                }
                let batch = broadcast_shapes(OP, &a.dims()[..ra - 2], &b.dims()[..rb - 2])?;
                if batch.len() + 2 > MAX_RANK {
                    return Err(Error::shape(OP, format!("rank exceeds {MAX_RANK}")));
                }
                if m.div_ceil(TILE) > MAX_GROUPS || n.div_ceil(TILE) > MAX_GROUPS {
                    return Err(Error::shape(
                        OP,
                        format!("output of {m} x {n} exceeds the dispatch limits"),
                    ));
                }
                let mut out_shape = batch.clone();
                out_shape.extend([m, n]);
                let out = Tensor::uninit(OP, &out_shape, self.device())?;
                matmul_into(&a, &b, &out, &Epilogue::default())?;
                let (a_grad, b_grad) = (a.requires_grad_flag(), b.requires_grad_flag());
                // A 2-D operand that is a transposed view (both operands 2-D, so no batch sums).
                let plain = out.rank() == 2 && a.rank() == 2 && b.rank() == 2;
                let transposed = |t: &Tensor| plain && t.strides()[0] == 1 && t.strides()[1] > 1;
                let mut result = record(out, &[&a, &b], |_| Op::Matmul {
                    a: b_grad.then(|| a.detach()),
                    b: a_grad.then(|| b.detach()),
                    a_shape: a.shape(),
                    b_shape: b.shape(),
                    a_t: transposed(&a),
                    b_t: transposed(&b),
                });
                if other.rank() == 1 {
                    result = result.squeeze(Some(-1))?;
                }
                if self.rank() == 1 {
                    result =
                        result.squeeze(Some(-2).filter(|_| result.rank() >= 2).or(Some(-1)))?;
                }
                Ok(result)
            },
        )
    }
}

impl Tensor {
    /// `self @ other` for 2-D operands with a chosen kernel, bypassing the autotuner (for
    /// benchmarks that compare kernels). Not recorded for autograd.
    #[doc(hidden)]
    pub fn matmul_with_kernel(&self, other: &Tensor, kernel: Kernel) -> Result<Tensor> {
        if self.rank() != 2 || other.rank() != 2 || self.dims()[1] != other.dims()[0] {
            return Err(Error::shape(
                "matmul_with_kernel",
                format!("{:?} x {:?}", self.dims(), other.dims()),
            ));
        }
        let kernel = super::tune::matmul_forced(kernel)?;
        let out = Tensor::uninit("matmul", &[self.dims()[0], other.dims()[1]], self.device())?;
        let (m, n) = (self.dims()[0], other.dims()[1]);
        let [tn, tm] = tile_of(kernel);
        let p = MatmulParams {
            m: m as u32,
            n: n as u32,
            k: self.dims()[1] as u32,
            batch_rank: 0,
            off_a: self.layout.offset as u32,
            off_b: other.layout.offset as u32,
            a_rs: self.strides()[0] as u32,
            a_cs: self.strides()[1] as u32,
            b_rs: other.strides()[0] as u32,
            b_cs: other.strides()[1] as u32,
            ..Zeroable::zeroed()
        };
        // The cooperative-matrix kernels multiply f16 operands only (and need the feature:
        // the dispatch says so where it is missing).
        if kernel.file().needs_cooperative_matrix() && self.device().has_cooperative_matrix() {
            return Err(Error::invalid(
                "matmul_with_kernel",
                format!(
                    "{kernel:?} multiplies f16 operands (half-precision frozen graphs), not f32"
                ),
            ));
        }
        // An aligned kernel needs its own layout.
        let needs = Aligned::of_kernel(kernel).map(|(l, _)| l);
        if needs.is_some() && Aligned::of(&p, &[], &[], false) != needs {
            return Err(Error::invalid(
                "matmul_with_kernel",
                format!("{kernel:?} does not fit these operands' layout"),
            ));
        }
        if m > 0 && n > 0 {
            // Err for a subgroup kernel on a device without suitable subgroups.
            self.device().dispatch_variant(
                kernel,
                Variant::F32,
                &[self.buffer(), other.buffer(), other.buffer()],
                &[out.buffer()],
                bytemuck::bytes_of(&p),
                [n.div_ceil(tn) as u32, m.div_ceil(tm) as u32, 1],
            )?;
        }
        Ok(out)
    }
}

/// The batch axes of `t` (all but its last two), broadcast to `batch`.
fn batch_layout(t: &Tensor, batch: &[usize]) -> Result<Layout> {
    let r = t.rank();
    Layout {
        shape: t.dims()[..r - 2].to_vec(),
        strides: t.strides()[..r - 2].to_vec(),
        offset: 0,
    }
    .broadcast_to("matmul", batch)
}

/// The parameters of an (m, n, k) product of `a` and `b` (its row stride `b_rs`) over the
/// `batch` axes, laid out in `a` and `b` as `layouts`.
fn params(
    a: &Tensor,
    b: &Tensor,
    [m, n, k]: [usize; 3],
    b_rs: usize,
    batch: &[usize],
    [la, lb]: [&Layout; 2],
    epi: &Epilogue<'_>,
) -> MatmulParams {
    let (ra, rb) = (a.rank(), b.rank());
    MatmulParams {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        batch_rank: batch.len() as u32,
        off_a: a.layout.offset as u32,
        off_b: b.layout.offset as u32,
        a_rs: a.strides()[ra - 2] as u32,
        a_cs: a.strides()[ra - 1] as u32,
        b_rs: b_rs as u32,
        b_cs: b.strides()[rb - 1] as u32,
        z_base: 0,
        epilogue: epi.flags(),
        act_alpha: epi.alpha(),
        off_bias: epi.off_bias(),
        col_split: 0,
        _pad: 0,
        bshape: pack(batch.iter().copied()),
        sa: pack(la.strides.iter().copied()),
        sb: pack(lb.strides.iter().copied()),
    }
}

/// Records `out = epilogue(a @ b)`: `a` (.., m, k) and `b` (.., k, n) of rank >= 2 with
/// broadcastable batch axes, `out` contiguous from offset 0 with the broadcast shape. Not
/// recorded for autograd.
pub(crate) fn matmul_into(a: &Tensor, b: &Tensor, out: &Tensor, epi: &Epilogue<'_>) -> Result<()> {
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k, n) = (a.dims()[ra - 2], a.dims()[ra - 1], b.dims()[rb - 1]);
    let batch = &out.dims()[..out.rank() - 2];
    let (la, lb) = (batch_layout(a, batch)?, batch_layout(b, batch)?);
    let count: usize = batch.iter().product();
    if m == 0 || n == 0 || count == 0 {
        return Ok(());
    }
    let p = params(a, b, [m, n, k], b.strides()[rb - 2], batch, [&la, &lb], epi);
    // A single product whose output has few tiles: its reduction split into parts (batches of
    // one product over a slice of k each), summed afterwards. Plain f32 products only: the
    // epilogue would have to follow the sum.
    if count == 1 && epi.is_plain() && epi.variant == Variant::F32 {
        let parts = super::tune::matmul_parts(out.device(), m, n, k / SPLIT_MIN_K);
        // Equal slices of whole vec4s.
        if let Some(parts) = (2..=parts).rev().find(|s| k.is_multiple_of(4 * s)) {
            let kc = k / parts;
            let (sa, sb) = (a.strides(), b.strides());
            let av = a.with_layout(Layout {
                shape: vec![parts, m, kc],
                strides: vec![kc * sa[ra - 1], sa[ra - 2], sa[ra - 1]],
                offset: a.layout.offset,
            });
            let bv = b.with_layout(Layout {
                shape: vec![parts, kc, n],
                strides: vec![kc * sb[rb - 2], sb[rb - 2], sb[rb - 1]],
                offset: b.layout.offset,
            });
            return sum_of_parts(parts, [m, n], out, |partial| {
                matmul_into(&av, &bv, partial, epi)
            });
        }
    }
    // A bias along the rows is read one element at a time, at any offset.
    let column_bias = epi.bias.is_some() && !epi.bias_rows;
    let aligned = Aligned::of(&p, &la.strides, &lb.strides, column_bias);
    run(a, b, out, epi, p, [m, n, k, count], aligned, count, false)
}

/// `out` (m n elements) = the sum over the first axis of `parts` partial (m, n) products,
/// which `product` records into the (parts, m, n) tensor it is given.
fn sum_of_parts(
    parts: usize,
    [m, n]: [usize; 2],
    out: &Tensor,
    product: impl FnOnce(&Tensor) -> Result<()>,
) -> Result<()> {
    let partial = Tensor::uninit("matmul", &[parts, m, n], out.device())?;
    product(&partial)?;
    super::reduce::sum_parts_into(&partial, out);
    Ok(())
}

/// The shortest slice of k that a split product's part takes.
const SPLIT_MIN_K: usize = 256;

/// How one dispatch of a vec4 matmul kernel covers a product of an im2col convolution (the
/// `FOLD_*` bits of the header that `build.rs` writes), instead of one product per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fold {
    /// `b` is (n / chunk, k, chunk) contiguous, read as (k, n): dy as (c_out, n oh ow).
    BCols(usize),
    /// `out` (m n elements) is written as (n / chunk, m, chunk): weight @ im2col into NCHW.
    OutCols(usize),
    /// `out` (m, n) is the sum of the batch's products: the weight gradient over the samples.
    Sum,
}

impl Fold {
    /// Its bit of the epilogue word: FOLD_B_COLS, FOLD_OUT_COLS and FOLD_SUM of the header
    /// that `build.rs` writes (the same values).
    fn bits(self) -> u32 {
        match self {
            Fold::BCols(_) => FOLD_B_COLS,
            Fold::OutCols(_) => FOLD_OUT_COLS,
            Fold::Sum => FOLD_SUM,
        }
    }
}

const FOLD_B_COLS: u32 = 0x10000;
const FOLD_OUT_COLS: u32 = 0x20000;
const FOLD_SUM: u32 = 0x40000;

/// Records `out = epilogue(a @ b)` in one dispatch through `fold`, with `a` (m, k) and `b`
/// (k, n) (`b` (n / chunk, k, chunk) for [`Fold::BCols`]; both batched for [`Fold::Sum`]).
/// Returns false, recording nothing, where the operands do not fit the vec4 kernels (which
/// alone fold) or the epilogue adds a bias along the columns. Not recorded for autograd.
pub(crate) fn matmul_folded(
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
    epi: &Epilogue<'_>,
    fold: Fold,
) -> Result<bool> {
    const OP: &str = "matmul";
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = match a.dims() {
        [.., m, k] => (*m, *k),
        _ => (0, 0),
    };
    let bad = || {
        Error::shape(
            OP,
            format!(
                "folded product {fold:?} of {:?} and {:?} into {:?}",
                a.dims(),
                b.dims(),
                out.dims()
            ),
        )
    };
    let (chunk, n, b_rs) = match (fold, b.dims()) {
        (Fold::BCols(c), &[q, bk, bc]) if ra == 2 && bk == k && bc == c && b.is_contiguous() => {
            (c, q * c, c)
        }
        (Fold::OutCols(c), &[bk, n]) if ra == 2 && bk == k => (c, n, b.strides()[0]),
        (Fold::Sum, [.., bk, n]) if ra >= 2 && *bk == k => (0, *n, b.strides()[rb - 2]),
        _ => return Err(bad()),
    };
    let chunk_ok = match fold {
        Fold::Sum => true,
        _ => chunk > 0 && chunk.is_multiple_of(4) && n.is_multiple_of(chunk),
    };
    let out_ok = out.is_contiguous() && out.layout.offset == 0;
    if out.numel() != m * n || !chunk_ok || !out_ok {
        return Err(bad());
    }
    // Too many columns for one dispatch: the caller runs per sample.
    if n.div_ceil(VEC4_COLS) > MAX_GROUPS {
        return Ok(false);
    }
    let batch = if fold == Fold::Sum {
        broadcast_shapes(OP, &a.dims()[..ra - 2], &b.dims()[..rb - 2])?
    } else {
        Vec::new()
    };
    let none = Layout {
        shape: vec![],
        strides: vec![],
        offset: 0,
    };
    let (la, lb) = if fold == Fold::Sum {
        (batch_layout(a, &batch)?, batch_layout(b, &batch)?)
    } else {
        (none.clone(), none)
    };
    let count: usize = batch.iter().product();
    if m == 0 || n == 0 || count == 0 || k == 0 {
        return Ok(false);
    }
    let mut p = params(a, b, [m, n, k], b_rs, &batch, [&la, &lb], epi);
    p.epilogue |= fold.bits();
    p.col_split = chunk as u32;
    let column_bias = epi.bias.is_some() && !epi.bias_rows;
    let aligned = Aligned::of(&p, &la.strides, &lb.strides, column_bias);
    // The kernels read B's columns through the fold only where B is row-major.
    let b_cols_ok = !matches!(fold, Fold::BCols(_)) || aligned != Some(Aligned::Nt);
    if aligned.is_none() || column_bias || !b_cols_ok {
        return Ok(false);
    }
    // With Fold::Sum, the batches summed in layers of `per` (the kernel's p.col_split), the
    // layers summed afterwards where there are too few output tiles to keep the device busy.
    let mut parts = 1;
    if fold == Fold::Sum {
        if epi.is_plain() {
            parts = super::tune::matmul_parts(out.device(), m, n, count);
        }
        let per = count.div_ceil(parts);
        parts = count.div_ceil(per);
        p.col_split = per as u32;
    }
    let dims = [m, n, k, count];
    if parts == 1 {
        run(a, b, out, epi, p, dims, aligned, 1, true)?;
    } else {
        sum_of_parts(parts, [m, n], out, |partial| {
            run(a, b, partial, epi, p, dims, aligned, parts, true)
        })?;
    }
    Ok(true)
}

/// Chooses the kernel of a product of `count` batches and records it in `layers` dispatch
/// layers (`count` of them, unless `folded` says that `p` folds them).
#[allow(clippy::too_many_arguments)]
fn run(
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
    epi: &Epilogue<'_>,
    p: MatmulParams,
    [m, n, k, count]: [usize; 4],
    aligned: Option<Aligned>,
    layers: usize,
    folded: bool,
) -> Result<()> {
    // Without a bias, any buffer fills the binding the kernel does not read.
    let bias = epi.bias.map_or(b.buffer(), |t| t.buffer());
    // The vec4 kernels leave an activation other than relu to an in-place pass over the output.
    let split = |kernel: Kernel| {
        epi.activation.is_some_and(|(op, _)| op != UnaryOp::Relu)
            && Aligned::of_kernel(kernel).is_some_and(|(_, vec4)| vec4)
    };
    let record = |kernel: Kernel| -> Result<Tensor> {
        let [tn, tm] = tile_of(kernel);
        let groups = [n.div_ceil(tn) as u32, m.div_ceil(tm) as u32];
        let mut p = p;
        if split(kernel) {
            p.epilogue &= !EPILOGUE_ACTIVATION_BITS;
        }
        let mut z = 0;
        while z < layers {
            let chunk = (layers - z).min(MAX_GROUPS);
            p.z_base = z as u32;
            out.device().dispatch_variant(
                kernel,
                epi.variant,
                &[a.buffer(), b.buffer(), bias],
                &[out.buffer()],
                bytemuck::bytes_of(&p),
                [groups[0], groups[1], chunk as u32],
            )?;
            z += chunk;
        }
        if let (true, Some((op, alpha))) = (split(kernel), epi.activation) {
            activation_in_place(out, op, alpha, epi.variant)?;
        }
        Ok(out.clone())
    };
    let coop = if folded || !out.device().has_cooperative_matrix() {
        None
    } else {
        coop_kernel(&p, epi.variant)
    };
    let kernel = super::tune::matmul(
        out.device(),
        [m, n, k, count],
        aligned,
        coop,
        epi.activation.is_some(),
        folded,
        &record,
    )?;
    record(kernel)?;
    Ok(())
}

/// `act(x W^T + b)` over the last axis of `x` in one dispatch, for inference: `w` is
/// (out, in) and `variant` gives the element type of the operands and the result. Not
/// recorded for autograd.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Option<(crate::UnaryOp, f32)>,
    variant: Variant,
) -> Result<Tensor> {
    const OP: &str = "linear";
    x.check_device(OP, w)?;
    if w.rank() != 2 || x.rank() == 0 || x.dims()[x.rank() - 1] != w.dims()[1] {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} must end in the features of weight {:?}",
                x.dims(),
                w.dims()
            ),
        ));
    }
    if let Some(b) = bias {
        x.check_device(OP, b)?;
        if b.dims() != [w.dims()[0]] {
            return Err(Error::shape(
                OP,
                format!("bias {:?} must be [{}]", b.dims(), w.dims()[0]),
            ));
        }
    }
    let (k, n) = (w.dims()[1], w.dims()[0]);
    let x = if x.is_contiguous() {
        x.clone()
    } else {
        x.contiguous()?
    };
    // The leading axes, flattened (not numel / k, which is 0 for k = 0).
    let rows: usize = x.dims()[..x.rank() - 1].iter().product();
    let mut shape = x.shape();
    *shape.last_mut().unwrap_or(&mut 0) = n;
    if rows.div_ceil(TILE) > MAX_GROUPS || n.div_ceil(TILE) > MAX_GROUPS {
        return Err(Error::shape(
            OP,
            format!("output of {rows} x {n} exceeds the dispatch limits"),
        ));
    }
    let out = match variant {
        Variant::F16 => crate::infer::graph::half_uninit(&[rows, n], x.device())?,
        _ => Tensor::uninit(OP, &[rows, n], x.device())?,
    };
    let mut x2 = Layout::contiguous(&[rows, k]);
    x2.offset = x.layout.offset;
    matmul_into(
        &x.with_layout(x2),
        &w.t()?,
        &out,
        &Epilogue {
            bias,
            activation: act,
            variant,
            bias_rows: false,
        },
    )?;
    Ok(out.with_layout(Layout::contiguous(&shape)))
}
