//! Kernel choice, in one place. Each family of interchangeable kernels lists its candidates
//! here, with a heuristic and, for problems large enough to pay for it, a timed choice that the
//! device remembers per shape class (and, when a cache file is given, across runs):
//!
//! - matmul, per operand layout ([`matmul`]);
//! - the three convolution passes ([`conv`]), and whether a convolution runs as an im2col
//!   matrix times the weight instead ([`conv_lowering`]);
//! - how many position splits the convolution weight gradient takes ([`conv_weight_splits`]),
//!   and how many parts a product with few output tiles splits its reduction into
//!   ([`matmul_parts`]);
//! - row reductions: one invocation or one workgroup per row ([`serial_rows`]), and whether few
//!   long rows are reduced in two stages ([`reduce_in_two_stages`]);
//! - the vec4 variants of the elementwise kernels ([`elementwise`]) and of the optimizer steps
//!   ([`optimizer_step`]), which read four elements at a time where the layout allows.
//!
//! The op files describe the problem (its layout, its sizes); the choice is made here. The
//! 2x2 max pooling stays in its op file: it is a different geometry, not a kernel choice.
//!
//! [`TuneMode::CrossCheck`] runs every candidate of each new (family, shape class) once and
//! compares their results with the heuristic's, an `Err` naming both kernels where they differ.
//! The `*_with` test and benchmark hooks of the ops force one candidate, checked here against
//! its family ([`ConvPass::forced`], [`matmul_forced`]), and bypass the choice.

use super::conv::ConvGeometry;
use super::matmul::Aligned;
use crate::device::{Device, TuneMode};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::tensor::Tensor;

/// Problems with fewer multiply-adds than this take the heuristic choice without timing.
pub(crate) const TUNE_MIN_WORK: usize = 1 << 21;

/// ceil(log2(v + 1)): the size bucket of a shape class.
pub(crate) fn log2_bucket(v: usize) -> u8 {
    (usize::BITS - v.max(1).leading_zeros()) as u8
}

/// Runs candidate `kernel` of a problem and returns its output.
pub(crate) type Record<'a> = &'a dyn Fn(Kernel) -> Result<Tensor>;

/// The choice for `(family, class)`: a remembered one, else (where the mode asks for it) the
/// fastest of `candidates` for problems of `work` from [`TUNE_MIN_WORK`] up, or the heuristic
/// once every candidate has been cross-checked against it (any size), else the heuristic.
fn pick(
    device: &Device,
    family: Kernel,
    class: [u8; 4],
    heuristic: Kernel,
    candidates: &[Kernel],
    work: usize,
    record: Record<'_>,
) -> Result<Kernel> {
    // A remembered choice (perhaps from a cache file) counts only if it is a candidate here.
    let valid = |k: &Kernel| *k == heuristic || candidates.contains(k);
    if let Some(kernel) = device.tuned(family, class).filter(valid) {
        return Ok(kernel);
    }
    match device.tune_mode() {
        TuneMode::Heuristic => Ok(heuristic),
        TuneMode::Timed if work < TUNE_MIN_WORK || candidates.is_empty() => Ok(heuristic),
        TuneMode::Timed => {
            let best = timed(device, candidates, record)?;
            device.set_tuned(family, class, best, true);
            Ok(best)
        }
        TuneMode::CrossCheck => {
            cross_check(heuristic, candidates, record)?;
            device.set_tuned(family, class, heuristic, false);
            Ok(heuristic)
        }
    }
}

/// The fastest of `candidates` by wall clock: each is recorded once (the first run compiles its
/// pipeline), then the best of three timed runs counts.
fn timed(device: &Device, candidates: &[Kernel], record: Record<'_>) -> Result<Kernel> {
    let mut best = (f64::INFINITY, candidates[0]);
    for &kernel in candidates {
        record(kernel)?;
        device.synchronize()?;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            record(kernel)?;
            device.synchronize()?;
            let s = t.elapsed().as_secs_f64();
            if s < best.0 {
                best = (s, kernel);
            }
        }
    }
    Ok(best.1)
}

/// Runs every candidate once and compares its output with the heuristic's: equal within 1e-3
/// of the largest magnitude (the candidates sum the same products in different orders), NaN
/// where it is NaN.
fn cross_check(heuristic: Kernel, candidates: &[Kernel], record: Record<'_>) -> Result<()> {
    // Half-precision outputs (frozen f16 graphs) are compared as f32.
    let values = |t: Tensor| t.to_dtype(crate::DType::F32)?.to_vec();
    let want = values(record(heuristic)?)?;
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    for &kernel in candidates.iter().filter(|&&k| k != heuristic) {
        let got = values(record(kernel)?)?;
        let bad = got.iter().zip(&want).position(|(g, w)| {
            !(g.is_nan() && w.is_nan() || g == w || (g - w).abs() <= 1e-3 * scale.max(1e-6))
        });
        if let Some(i) = bad.or((got.len() != want.len()).then_some(0)) {
            return Err(Error::invalid(
                "tune",
                format!(
                    "cross-check: {kernel:?} gives {} at element {i} where {:?} gives {} \
                     ({} elements, largest magnitude {scale})",
                    got.get(i).copied().unwrap_or(f32::NAN),
                    heuristic,
                    want.get(i).copied().unwrap_or(f32::NAN),
                    want.len()
                ),
            ));
        }
    }
    Ok(())
}

/// The matmul kernels that take any operand layout.
const GENERAL_MATMULS: [Kernel; 4] = [
    Kernel::MatmulFwd,
    Kernel::MatmulTiledFwd,
    Kernel::MatmulTiled128Fwd,
    Kernel::MatmulReg8Fwd,
];

/// `kernel`, asked for by a test or benchmark hook, if it is a matmul kernel (whether it fits
/// the operands' layout is the caller's check).
pub(crate) fn matmul_forced(kernel: Kernel) -> Result<Kernel> {
    let coop = [Kernel::MatmulCoop16NnFwd, Kernel::MatmulCoop16NtFwd];
    if GENERAL_MATMULS.contains(&kernel)
        || Aligned::of_kernel(kernel).is_some()
        || coop.contains(&kernel)
    {
        return Ok(kernel);
    }
    Err(Error::invalid(
        "matmul_with_kernel",
        format!("{kernel:?} is not a matmul kernel"),
    ))
}

/// The kernel for an (m, n, k) x `count` product. `aligned` is the operands' layout when the
/// vec4-reading kernels fit it; `activation` says whether the epilogue applies one (the
/// `matmul_vec4_*` kernels then need a second pass for any but relu, which changes the costs).
///
/// Heuristic: on software adapters the vec4 kernel, A shared through subgroups where they
/// have 8 or more invocations (1.4x on lavapipe); elsewhere the shared-memory tiled kernel for
/// products of 64x64 and more, the 4x4 register kernel below. Shared-memory kernels are left
/// out of the timed candidates on software adapters, where barriers are costly.
///
/// A `folded` product ([`super::matmul::Fold`], always aligned) has only the kernels that fold:
/// the vec4 one and its subgroup versions. `coop` is the cooperative-matrix kernel that fits
/// the product, on a device that has them: the heuristic choice (f16 operands on tensor cores,
/// accumulating in f32), timed against the others. Untested on hardware so far.
pub(crate) fn matmul(
    device: &Device,
    [m, n, k, count]: [usize; 4],
    aligned: Option<Aligned>,
    coop: Option<Kernel>,
    activation: bool,
    folded: bool,
    record: Record<'_>,
) -> Result<Kernel> {
    let software = device.is_software();
    // The top bit of the batch bucket marks a fused activation, the next ones a fold and a
    // product that cooperative matrices fit.
    let flag = |on: bool, bit: u8| if on { bit } else { 0 };
    let class = [
        log2_bucket(m),
        log2_bucket(n),
        log2_bucket(k),
        log2_bucket(count)
            | flag(activation, 0x80)
            | flag(folded, 0x40)
            | flag(coop.is_some(), 0x20),
    ];
    let heuristic = match (coop, aligned) {
        (Some(c), _) => c,
        (_, Some(l)) if software && device.subgroups_of_at_least(8) => l.sg8(),
        (_, Some(l)) if software || folded => l.vec4(),
        _ if m >= 64 && n >= 64 && k >= 16 => Kernel::MatmulTiledFwd,
        _ => Kernel::MatmulFwd,
    };
    let mut candidates = match () {
        _ if folded => Vec::new(),
        _ if software => vec![Kernel::MatmulFwd, Kernel::MatmulReg8Fwd],
        _ => GENERAL_MATMULS.to_vec(),
    };
    if let Some(l) = aligned {
        candidates.push(l.vec4());
        if !software && !folded {
            candidates.push(l.t128());
        }
        // The subgroup kernels where every subgroup has 8 or more invocations; the 32-wide
        // one only where subgroups are that wide (on narrower ones it idles lanes past n).
        if device.subgroups_of_at_least(8) {
            candidates.push(l.sg8());
            if device.adapter_info().subgroup_max_size >= 32 {
                candidates.push(l.sg32());
            }
        }
    }
    candidates.extend(coop);
    // Choices are kept per family of candidates: an aligned kernel never serves unaligned
    // operands.
    let family = coop
        .or(aligned.map(Aligned::vec4))
        .unwrap_or(Kernel::MatmulFwd);
    pick(
        device,
        family,
        class,
        heuristic,
        &candidates,
        m * n * k * count,
        record,
    )
}

/// A pass of conv2d: a family of three interchangeable kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConvPass {
    Forward,
    InputGrad,
    WeightGrad,
}

impl ConvPass {
    /// `[register, register with subgroups, tiled]`.
    pub(crate) fn kernels(self) -> [Kernel; 3] {
        match self {
            ConvPass::Forward => [
                Kernel::Conv2dFwd,
                Kernel::Conv2dSgFwd,
                Kernel::Conv2dTiledFwd,
            ],
            ConvPass::InputGrad => [
                Kernel::Conv2dBwdInput,
                Kernel::Conv2dSgBwdInput,
                Kernel::Conv2dBwdInputTiled,
            ],
            ConvPass::WeightGrad => [
                Kernel::Conv2dBwdWeight,
                Kernel::Conv2dSgBwdWeight,
                Kernel::Conv2dBwdWeightTiled,
            ],
        }
    }

    /// `kernel`, asked for by a test or benchmark hook, if it is one of this pass's.
    pub(crate) fn forced(self, kernel: Kernel) -> Result<Kernel> {
        if self.kernels().contains(&kernel) {
            return Ok(kernel);
        }
        let (op, what) = match self {
            ConvPass::Forward => ("conv2d", "forward"),
            ConvPass::InputGrad => ("conv2d_backward", "input-gradient"),
            ConvPass::WeightGrad => ("conv2d_backward", "weight-gradient"),
        };
        Err(Error::invalid(
            op,
            format!("{kernel:?} is not a conv2d {what} kernel"),
        ))
    }
}

/// The kernel of `pass` for a GEMM of `rows` x `cols` x `depth` per group.
///
/// Heuristic: on software adapters, where barriers are costly, a register kernel (the subgroup
/// one where subgroups have 8 or more invocations: fewer loads of the shared operand);
/// elsewhere the tiled one where `tiled_by_default`, else the register kernel.
pub(crate) fn conv(
    device: &Device,
    [rows, cols, depth, groups]: [usize; 4],
    pass: ConvPass,
    tiled_by_default: bool,
    record: Record<'_>,
) -> Result<Kernel> {
    let [register, subgroup, tiled] = pass.kernels();
    let subgroups = device.subgroups_of_at_least(8);
    let software = device.is_software();
    let heuristic = match (software, subgroups) {
        (true, true) => subgroup,
        (true, false) => register,
        _ if tiled_by_default => tiled,
        _ => register,
    };
    // Software adapters time no convolution kernel (the heuristic's lead there is wide), but
    // a cross-check runs them all.
    let mut candidates = Vec::new();
    if !software || device.tune_mode() == TuneMode::CrossCheck {
        candidates = vec![heuristic, if tiled_by_default { register } else { tiled }];
        if subgroups {
            candidates.push(subgroup);
        }
        if !candidates.contains(&tiled) {
            candidates.push(tiled);
        }
    }
    let class = [
        log2_bucket(rows),
        log2_bucket(cols),
        log2_bucket(depth),
        log2_bucket(groups),
    ];
    pick(
        device,
        register,
        class,
        heuristic,
        &candidates,
        rows * cols * depth * groups,
        record,
    )
}

/// Whether a convolution runs as an explicit im2col matrix times the weight (vec4 matmuls)
/// rather than the implicit-GEMM kernels: on software adapters, for one group, 32 output
/// channels or more, output planes that the vec4 matmul kernels take (multiples of 4) and an
/// im2col matrix of `rows` (its depth, padded to a multiple of 4 unless `padded_ok` is false,
/// as for the input gradient) that fits a binding. There the matmul kernels' vec4 loads and
/// register blocking beat the convolution kernels' gathers by about 2x at the channel counts of
/// small CNNs; hardware adapters keep the tuned convolution kernels (untested there).
pub(crate) fn conv_lowering(
    device: &Device,
    g: &ConvGeometry,
    rows: usize,
    padded_ok: bool,
) -> bool {
    let depth = g.c_in * g.k[0] * g.k[1];
    let plane = g.oh * g.ow;
    let elements = rows * g.n * plane;
    device.is_software()
        && g.groups == 1
        && g.c_out >= 32
        && (padded_ok || rows == depth)
        && plane.is_multiple_of(4)
        && elements > 0
        && (elements as u64) * 4 <= device.max_binding_bytes()
        && elements < u32::MAX as usize
}

/// How many parts the convolution weight gradient splits its reduction over `positions` into,
/// for `tiles` output tiles: enough workgroups to fill the device (a few on a software
/// adapter's cores), at least 256 positions a part, at most 64 parts and the dispatch limit.
pub(crate) fn conv_weight_splits(
    device: &Device,
    tiled: bool,
    tiles: usize,
    positions: usize,
    groups: usize,
    max_groups: usize,
) -> usize {
    let target: usize = if device.is_software() {
        8
    } else if tiled {
        512
    } else {
        1024
    };
    target
        .div_ceil(tiles)
        .min(positions.div_ceil(256))
        .min(64)
        .clamp(1, max_groups / groups.max(1))
}

/// How many parts a product with an (m, n) output splits its reduction into (`most` at most:
/// its batches to sum, or k / 256), summed afterwards: enough to give the device's cores
/// about `target` workgroups where the vec4 kernels' 16 x 128 tiles would give fewer (8 on a
/// software adapter, one per core and some to balance; 256 elsewhere, untested on GPUs).
/// Returns 1 where no split pays.
pub(crate) fn matmul_parts(device: &Device, m: usize, n: usize, most: usize) -> usize {
    let target: usize = if device.is_software() { 8 } else { 256 };
    let tiles = m.div_ceil(16) * n.div_ceil(128);
    target.div_ceil(tiles).min(most).max(1)
}

/// How the operands of an elementwise op are laid out, as far as the choice of kernel goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ElementwiseLayout {
    /// Every operand contiguous, with the same shape as the output, in whole vec4s at
    /// 4-aligned offsets.
    Vec4,
    /// Each operand's innermost axis contiguous (read as vec4s) or broadcast, with 4-aligned
    /// other strides and offsets, and an innermost axis of a multiple of 4.
    Strided4,
    /// Anything else.
    Any,
}

/// The kernel that runs the elementwise `kernel` over operands laid out as `layout`: its vec4
/// variant where there is one for the layout (a quarter of the loads and index splits), else
/// `kernel`.
pub(crate) fn elementwise(kernel: Kernel, layout: ElementwiseLayout) -> Kernel {
    use ElementwiseLayout::{Strided4, Vec4};
    match (kernel, layout) {
        (Kernel::UnaryFwd, Strided4) => Kernel::UnaryStrided4Fwd,
        (Kernel::BinaryFwd, Strided4) => Kernel::BinaryStrided4Fwd,
        (Kernel::UnaryFwd, Vec4) => Kernel::UnaryVec4Fwd,
        (Kernel::BinaryFwd, Vec4) => Kernel::BinaryVec4Fwd,
        (Kernel::BinaryScalarFwd, Vec4) => Kernel::BinaryScalarVec4Fwd,
        (Kernel::UnaryBwd, Vec4) => Kernel::UnaryVec4Bwd,
        (k, _) => k,
    }
}

/// Whether the elementwise `kernel` has a vec4 variant for strided operands (then its caller
/// checks [`ElementwiseLayout::Strided4`]).
pub(crate) fn elementwise_has_strided4(kernel: Kernel) -> bool {
    elementwise(kernel, ElementwiseLayout::Strided4) != kernel
}

/// The kernel of an optimizer step and the elements each invocation updates: the vec4
/// variant where the tensor is whole vec4s at 4-aligned offsets (`aligned`), else the scalar
/// kernel.
pub(crate) fn optimizer_step(kernel: Kernel, aligned: bool) -> (Kernel, usize) {
    match kernel {
        _ if !aligned => (kernel, 1),
        Kernel::SgdStep => (Kernel::SgdVec4Step, 4),
        Kernel::SgdMomentumStep => (Kernel::SgdMomentumVec4Step, 4),
        Kernel::AdamStep => (Kernel::AdamVec4Step, 4),
        k => (k, 1),
    }
}

/// Rows at least this long, when there are few of them, are reduced in two stages.
const SPLIT_MIN_LEN: usize = 8192;
const SPLIT_MAX_ROWS: usize = 256;

/// Whether `rows` rows of `len` elements are reduced in two stages (partial results of
/// chunks of each row, then combined) so that more than a handful of workgroups share the
/// work: at least 8192 elements a row and at most 256 rows.
pub(crate) fn reduce_in_two_stages(rows: usize, len: usize) -> bool {
    len >= SPLIT_MIN_LEN && rows <= SPLIT_MAX_ROWS
}

/// Whether row reductions run one row per invocation (no barriers: software adapters) rather
/// than one workgroup per row (GPUs, where a serial row would leave most of the chip idle and
/// wait on every load), unless a test forces one.
pub(crate) fn serial_rows(device: &Device) -> bool {
    device
        .row_reduction_override()
        .unwrap_or(device.is_software())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cross-check passes candidates that agree (within its tolerance, NaN for NaN) and
    /// names the first that does not, with the element and both values.
    #[test]
    fn cross_check_names_the_candidate_that_differs() {
        let d = Device::default_device().unwrap();
        let outputs = |v: [f32; 3]| Tensor::from_slice(&v, &[3], &d);
        let record = |k: Kernel| match k {
            Kernel::MatmulFwd => outputs([1.0, f32::NAN, -2.0]),
            Kernel::MatmulReg8Fwd => outputs([1.0 + 1e-4, f32::NAN, -2.0]),
            _ => outputs([1.0, f32::NAN, -1.5]),
        };
        let agree = [Kernel::MatmulFwd, Kernel::MatmulReg8Fwd];
        cross_check(Kernel::MatmulFwd, &agree, &record).unwrap();
        let e = cross_check(
            Kernel::MatmulFwd,
            &[Kernel::MatmulReg8Fwd, Kernel::MatmulTiledFwd],
            &record,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MatmulTiledFwd gives -1.5 at element 2 where MatmulFwd gives -2"),
            "{e}"
        );
    }
}
