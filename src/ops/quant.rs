//! Int8 kernels (`shaders/quant.wgsl`): quantization of f32 rows, pixels or convolution
//! patches into packed int8 words, dequantization, and the integer matrix product of
//! quantized linear layers and convolutions (over rows, or through a window over quantized
//! pixels) with its dequantizing or requantizing epilogue. Int8 tensors are [`DType::I32`]
//! tensors of words, four int8 values to a word along the reduction axis, rows padded to
//! whole groups of 16 values.
//!
//! The frozen graph's quantized ops (`src/infer/quantize.rs`) run these; the int8 output
//! mode carries chained int8 layers, and dequantization serves the tests.
#![allow(dead_code)]

use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::elementwise::UnaryOp;
use crate::ops::grid;
use crate::quant::QParams;
use crate::tensor::{DType, Tensor};

/// The WGSL `Params` of `shaders/quant.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct QuantParams {
    pub m: u32,
    pub n: u32,
    pub k4: u32,
    pub n_words: u32,
    pub mode: u32,
    pub act: u32,
    pub act_on: u32,
    pub zy: i32,
    pub lo: i32,
    pub _pad2: u32,
    pub alpha: f32,
    pub scale: f32,
    pub zp: i32,
    pub count: u32,
    pub rows: u32,
    pub ohw: u32,
    pub c: u32,
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
    pub plane: u32,
    pub _pad1: u32,
}

impl QuantParams {
    /// These parameters with a convolution window: kernel, stride, padding and dilation,
    /// each (height, width).
    fn with_window(self, [k, s, pad, d]: [[usize; 2]; 4]) -> QuantParams {
        let u = |v: usize| v as u32;
        QuantParams {
            kh: u(k[0]),
            kw: u(k[1]),
            sh: u(s[0]),
            sw: u(s[1]),
            ph: u(pad[0]),
            pw: u(pad[1]),
            dh: u(d[0]),
            dw: u(d[1]),
            ..self
        }
    }
}

/// Words of `count` int8 values, four to a word.
pub(crate) fn words(count: usize) -> usize {
    count.div_ceil(4)
}

/// Words per packed row of `count` int8 values: whole groups of 16 values (four words), so
/// that the integer product reads its operands as vec4s.
pub(crate) fn padded_words(count: usize) -> usize {
    count.div_ceil(16) * 4
}

/// Packs int8 rows of `count` values into rows of `k4` words, padding each row with `pad`.
pub(crate) fn pack_rows(q: &[i8], count: usize, k4: usize, pad: i8) -> Vec<u32> {
    let rows = q.len().checked_div(count).unwrap_or(0);
    let mut out = vec![0u32; rows * k4];
    for r in 0..rows {
        for w in 0..k4 {
            let mut word = 0u32;
            for i in 0..4 {
                let col = w * 4 + i;
                let v = if col < count { q[r * count + col] } else { pad };
                word |= (v as u8 as u32) << (8 * i);
            }
            out[r * k4 + w] = word;
        }
    }
    out
}

/// The requantization multiplier and shift of a real multiplier `m` > 0: `m ~ mult / 2^shift`
/// with `mult` in [2^30, 2^31) and `shift` in 1..=63.
pub(crate) fn multiplier(op: &'static str, m: f64) -> Result<(u32, u32)> {
    if !(m.is_finite() && m > 0.0) {
        return Err(Error::invalid(op, format!("requantization multiplier {m}")));
    }
    let mut shift: i32 = 30 - m.log2().floor() as i32;
    let mut mult = (m * 2f64.powi(shift)).round();
    if mult >= 2f64.powi(31) {
        mult /= 2.0;
        shift -= 1;
    }
    if !(1..=63).contains(&shift) {
        return Err(Error::invalid(
            op,
            format!("requantization multiplier {m} is out of range"),
        ));
    }
    Ok((mult as u32, shift as u32))
}

/// The integer requantization of `shaders/quant.wgsl`, for references and tests:
/// `clamp(zy + round_half_even(acc * mult / 2^shift), lo, 127)`.
pub(crate) fn requantize(acc: i32, mult: u32, shift: u32, zy: i32, lo: i32) -> i32 {
    let mag = acc.unsigned_abs() as u64 * mult as u64;
    let mut q = mag >> shift;
    let rem = mag & ((1u64 << shift) - 1);
    let half = 1u64 << (shift - 1);
    if rem > half || (rem == half && q & 1 == 1) {
        q += 1;
    }
    let q = q.min(0x7fff_ffff) as i64;
    let signed = if acc < 0 { -q } else { q };
    (zy as i64 + signed.clamp(-65536, 65536)).clamp(lo as i64, 127) as i32
}

fn word_tensor(op: &'static str, n: usize, dev: &crate::Device) -> Result<Tensor> {
    Tensor::alloc_typed(op, &[n.max(1)], DType::I32, dev, false)
}

/// Quantizes `x`, f32 `(n, c, h, w)` contiguous, into its pixels: `(n h w, padded_words(c))`
/// words, channels innermost; the channels past `c` hold the zero point.
fn quantize_pixels(
    op: &'static str,
    x: &Tensor,
    [n, c, h, w]: [usize; 4],
    q: QParams,
) -> Result<Tensor> {
    let x = x.dense()?;
    let pixels = n * h * w;
    let k4 = padded_words(c);
    let u = |v: usize| v as u32;
    if c == 0 || x.numel() != n * c * h * w || pixels.checked_mul(k4).is_none_or(|t| t >= 1 << 31) {
        return Err(Error::shape(
            op,
            format!("{} values as ({n}, {c}, {h}, {w})", x.numel()),
        ));
    }
    let out = word_tensor(op, pixels * k4, x.device())?;
    let p = QuantParams {
        scale: q.scale,
        zp: q.zero_point,
        rows: u(pixels),
        k4: u(k4),
        c: u(c),
        h: u(h),
        w: u(w),
        ..Default::default()
    };
    x.device().dispatch(
        Kernel::QuantizeFwd,
        &[x.buffer()],
        out.buffer(),
        bytemuck::bytes_of(&p),
        grid(pixels * k4, 256),
    );
    Ok(out)
}

/// `x` (f32, contiguous rows of `count`) quantized into int8 words,
/// `(rows, padded_words(count))`.
pub(crate) fn quantize_rows(x: &Tensor, count: usize, q: QParams) -> Result<Tensor> {
    const OP: &str = "quantize";
    let n = x.numel();
    if count == 0 || !n.is_multiple_of(count) {
        return Err(Error::shape(OP, format!("{n} values in rows of {count}")));
    }
    quantize_pixels(OP, x, [n / count, count, 1, 1], q)
}

/// `x` (f32 NCHW) quantized into its pixels, the input of a windowed [`qgemm`]:
/// `(n h w, padded_words(c))` words, channels innermost.
pub(crate) fn quantize_nhwc(x: &Tensor, q: QParams) -> Result<Tensor> {
    let [n, c, h, w] = x.dims() else {
        return Err(Error::shape(
            "quantize_nhwc",
            format!("input {:?} must be NCHW", x.dims()),
        ));
    };
    quantize_pixels("quantize_nhwc", x, [*n, *c, *h, *w], q)
}

/// The quantized patch rows of a convolution of `x` (f32 NCHW, contiguous) with geometry
/// `g` (groups 1): `(n * oh * ow, padded_words(c * kh * kw))` words, padding taps at the zero
/// point.
pub(crate) fn quantize_im2col(
    x: &Tensor,
    g: &crate::ops::conv::ConvGeometry,
    q: QParams,
) -> Result<Tensor> {
    const OP: &str = "quantize_im2col";
    if g.groups != 1 || x.dims() != [g.n, g.c_in, g.h, g.w] {
        return Err(Error::shape(OP, format!("input {:?} for {g:?}", x.dims())));
    }
    let x = x.dense()?;
    let count = g.c_in * g.k[0] * g.k[1];
    if count > 1 << 24 {
        return Err(Error::invalid(
            OP,
            format!("patches of {count} values are too large"),
        ));
    }
    let rows = g.n * g.oh * g.ow;
    let k4 = padded_words(count);
    let out = word_tensor(OP, rows * k4, x.device())?;
    let u = |v: usize| v as u32;
    let p = QuantParams {
        scale: q.scale,
        zp: q.zero_point,
        count: u(count),
        rows: u(rows),
        k4: u(k4),
        c: u(g.c_in),
        h: u(g.h),
        w: u(g.w),
        oh: u(g.oh),
        ow: u(g.ow),
        ..Default::default()
    }
    .with_window([g.k, g.stride, g.padding, g.dilation]);
    // Per tap: the channel plane's offset and the tap's place in the window.
    let mut table = Vec::with_capacity(count * 3);
    for ch in 0..g.c_in {
        for ky in 0..g.k[0] {
            for kx in 0..g.k[1] {
                table.extend_from_slice(&[
                    (ch * g.h * g.w) as i32,
                    (ky * g.dilation[0]) as i32,
                    (kx * g.dilation[1]) as i32,
                ]);
            }
        }
    }
    let table = Tensor::from_slice_i32(&table, &[table.len()], x.device())?;
    x.device().dispatch(
        Kernel::QuantizeIm2colFwd,
        &[x.buffer(), table.buffer()],
        out.buffer(),
        bytemuck::bytes_of(&p),
        grid(rows * k4, 256),
    );
    Ok(out)
}

/// `x` (f32, contiguous rows of `count`) quantized with the scale and zero point of its own
/// range, computed on the GPU: 4 header words (scale, zero point) then
/// `(rows, padded_words(count))`.
pub(crate) fn quantize_rows_dynamic(x: &Tensor, count: usize) -> Result<Tensor> {
    const OP: &str = "quantize_dynamic";
    let x = x.dense()?;
    let n = x.numel();
    if count == 0 || !n.is_multiple_of(count) || n == 0 {
        return Err(Error::shape(OP, format!("{n} values in rows of {count}")));
    }
    let rows = n / count;
    let k4 = padded_words(count);
    let range = Tensor::concat(
        &[
            &x.min(&[], false)?.reshape(&[1])?,
            &x.max(&[], false)?.reshape(&[1])?,
        ],
        0,
    )?
    .dense()?;
    let out = word_tensor(OP, 4 + rows * k4, x.device())?;
    let p = QuantParams {
        rows: rows as u32,
        k4: k4 as u32,
        c: count as u32,
        h: 1,
        w: 1,
        ..Default::default()
    };
    x.device().dispatch(
        Kernel::QuantizeDynFwd,
        &[x.buffer(), range.buffer()],
        out.buffer(),
        bytemuck::bytes_of(&p),
        grid((rows * k4).max(1), 256),
    );
    Ok(out)
}

/// Int8 words `(rows, k4)` back to f32 `(rows, count)`.
pub(crate) fn dequantize_rows(
    q: &Tensor,
    rows: usize,
    count: usize,
    k4: usize,
    p: QParams,
) -> Result<Tensor> {
    const OP: &str = "dequantize";
    if q.numel() < rows * k4 || k4 < words(count) {
        return Err(Error::shape(
            OP,
            format!(
                "{} words for {rows} rows of {count} in {k4} words",
                q.numel()
            ),
        ));
    }
    let q = q.dense()?;
    let out = Tensor::uninit(OP, &[rows, count], q.device())?;
    let params = QuantParams {
        scale: p.scale,
        zp: p.zero_point,
        count: count as u32,
        rows: rows as u32,
        k4: k4 as u32,
        ..Default::default()
    };
    q.device().dispatch(
        Kernel::DequantizeFwd,
        &[q.buffer()],
        out.buffer(),
        bytemuck::bytes_of(&params),
        grid(rows * count, 256),
    );
    Ok(out)
}

/// What the integer matrix product writes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum QOut {
    /// f32 `acc * scale[c]`, then an activation.
    F32 { act: Option<(UnaryOp, f32)> },
    /// Int8 rows of `padded_words(n)` words, requantized to zero point `zy`; `relu` clamps at
    /// the zero point.
    I8 { zy: i32, relu: bool },
    /// f32, for activations quantized at run time ([`quantize_rows_dynamic`]): the channel
    /// data is the weight row's sum, its scale and the f32 bias.
    Dynamic { act: Option<(UnaryOp, f32)> },
}

/// The window of a convolution run directly over quantized pixels ([`quantize_nhwc`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct QWindow {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    /// The pixel grid of one input image.
    pub grid: [usize; 2],
    /// The activations' zero point, which taps in the padding read.
    pub zero_point: i32,
}

impl QWindow {
    /// The output grid, or `None` where the window does not fit.
    pub fn output(&self) -> Option<[usize; 2]> {
        let side = |i: usize| {
            let span = self.dilation[i].checked_mul(self.kernel[i].checked_sub(1)?)? + 1;
            let padded = self.grid[i].checked_add(self.padding[i].checked_mul(2)?)?;
            let room = padded.checked_sub(span)?;
            Some(room / self.stride[i].max(1) + 1)
        };
        Some([side(0)?, side(1)?])
    }
}

/// The operands of [`qgemm`]: `m` rows by `n` channels over `k4` words per pixel (a multiple
/// of 4). Plain rows read `(m, k4)` activation words and `(n, k4)` weight words. With a
/// window, rows are the output positions of a convolution over quantized pixels, and the
/// weights are `(n, kh kw k4)`, taps outermost. `ohw` > 0 (f32 outputs) writes the result as
/// `(m / ohw, n, ohw)`, NCHW.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct QShape {
    pub m: usize,
    pub n: usize,
    pub k4: usize,
    pub ohw: usize,
    pub window: Option<QWindow>,
}

/// The integer product of int8 activations `a` and weights `b`, with per-channel data `c`
/// (3 words a channel, see `shaders/quant.wgsl`), shaped by `s`. `manual` computes the dot
/// products without the built-in.
pub(crate) fn qgemm(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    s: &QShape,
    out: QOut,
    manual: bool,
) -> Result<Tensor> {
    const OP: &str = "qgemm";
    // The kernel indexes its buffers from the start: each operand must be dense words that
    // its buffer holds.
    for (name, t) in [("activations", a), ("weights", b), ("channel data", c)] {
        let whole = t.is_contiguous()
            && t.layout.offset == 0
            && t.dtype() == DType::I32
            && t.buffer().size() >= t.numel() as u64 * 4;
        if !whole {
            return Err(Error::invalid(
                OP,
                format!(
                    "the {name} must be dense i32 words, got {:?} {:?}",
                    t.dtype(),
                    t.layout
                ),
            ));
        }
    }
    let &QShape {
        m,
        n,
        k4,
        ohw,
        window,
    } = s;
    let header = if matches!(out, QOut::Dynamic { .. }) {
        4
    } else {
        0
    };
    let (taps, grid_hw, out_hw, pixels) = match window {
        None => (1, [1, 1], [1, 1], Some(m)),
        Some(w) => {
            let o = w.output().filter(|o| o[0] * o[1] > 0);
            let per_image = o.map_or(0, |o| o[0] * o[1]);
            let images = (per_image > 0 && m.is_multiple_of(per_image)).then(|| m / per_image);
            (
                w.kernel[0] * w.kernel[1],
                w.grid,
                o.unwrap_or([0, 0]),
                images.and_then(|i| i.checked_mul(w.grid[0] * w.grid[1])),
            )
        }
    };
    let fits = pixels.is_some_and(|px| a.numel() >= header + px * k4)
        && b.numel() >= n * taps * k4
        && c.numel() >= channel_layout(n, &out).0 * channel_layout(n, &out).1
        && k4 > 0
        && k4.is_multiple_of(4)
        && n > 0
        && m > 0
        && (ohw == 0 || m.is_multiple_of(ohw))
        && (ohw == 0 || !matches!(out, QOut::I8 { .. }));
    if !fits {
        return Err(Error::shape(
            OP,
            format!(
                "operands of {} / {} / {} words for {s:?} and {out:?}",
                a.numel(),
                b.numel(),
                c.numel()
            ),
        ));
    }
    let (mode, act, zy, lo) = match out {
        QOut::F32 { act } => (0, act, 0, -128),
        QOut::Dynamic { act } => (2, act, 0, -128),
        QOut::I8 { zy, relu } => (1, None, zy, if relu { zy } else { -128 }),
    };
    // Invocations cover 8 channels; int8 rows are whole words of 16 channels.
    let col_groups = match out {
        QOut::I8 { .. } => padded_words(n) / 2,
        _ => n.div_ceil(8),
    };
    let result = match out {
        QOut::F32 { .. } | QOut::Dynamic { .. } => Tensor::uninit(OP, &[m, n], a.device())?,
        QOut::I8 { .. } => word_tensor(OP, m * padded_words(n), a.device())?,
    };
    let u = |v: usize| v as u32;
    let w = window.unwrap_or(QWindow {
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0, 0],
        dilation: [1, 1],
        grid: [1, 1],
        zero_point: 0,
    });
    let p = QuantParams {
        m: u(m),
        n: u(n),
        k4: u(k4),
        n_words: u(col_groups * 2),
        mode,
        act: act.map_or(0, |(op, _)| op as u32),
        act_on: act.is_some() as u32,
        alpha: act.map_or(0.0, |(_, a)| a),
        zy,
        lo,
        ohw: u(ohw),
        h: u(grid_hw[0]),
        w: u(grid_hw[1]),
        oh: u(out_hw[0]),
        ow: u(out_hw[1]),
        zp: w.zero_point,
        plane: u(channel_layout(n, &out).1),
        ..Default::default()
    }
    .with_window([w.kernel, w.stride, w.padding, w.dilation]);
    // Workgroups of 8 invocations, 4 rows each; row blocks beyond 65535 workgroups continue
    // along z.
    let row_groups = m.div_ceil(32);
    let groups = [
        row_groups.min(65535) as u32,
        col_groups as u32,
        row_groups.div_ceil(65535) as u32,
    ];
    if col_groups > 65535 || groups[2] > 65535 || m >= 1 << 31 {
        return Err(Error::invalid(
            OP,
            format!("{m} x {n} exceeds one dispatch"),
        ));
    }
    let kernel = match act {
        _ if manual => Kernel::QgemmManualFwd,
        None | Some((UnaryOp::Relu, _)) => Kernel::QgemmFwd,
        Some(_) => Kernel::QgemmActFwd,
    };
    a.device().dispatch(
        kernel,
        &[a.buffer(), b.buffer(), c.buffer()],
        result.buffer(),
        bytemuck::bytes_of(&p),
        groups,
    );
    Ok(result)
}

/// The layout of [`qgemm`]'s per-channel data for an output of `n` channels: planes of
/// `plane` words each (n rounded up to as far as the product's invocations reach, 8 channels
/// each, whole int8 words of 16 channels in int8 output), so that it reads the data as vec4s
/// and never past its end. Static f32 outputs have two planes (the i32 bias, the f32 scale),
/// int8 outputs three (bias, requantization multiplier, shift), dynamic ones three (the
/// weight row's sum, its scale, the f32 bias).
pub(crate) fn channel_layout(n: usize, out: &QOut) -> (usize, usize) {
    match out {
        QOut::F32 { .. } => (2, n.div_ceil(8) * 8),
        QOut::Dynamic { .. } => (3, n.div_ceil(8) * 8),
        QOut::I8 { .. } => (3, n.div_ceil(16) * 16),
    }
}

/// Per-channel data for [`qgemm`] writing `out`: the planes of [`channel_layout`], each
/// padded with zeros.
pub(crate) fn channel_words(planes: &[&[u32]], out: &QOut) -> Vec<u32> {
    let n = planes.first().map_or(0, |p| p.len());
    let (count, plane) = channel_layout(n, out);
    let mut words = vec![0u32; count * plane];
    for (k, p) in planes.iter().take(count).enumerate() {
        words[k * plane..k * plane + p.len()].copy_from_slice(p);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn i8(&mut self) -> i8 {
            (self.next() % 256) as i32 as u8 as i8
        }
    }

    fn upload(words: &[u32], dev: &Device) -> Tensor {
        let v: Vec<i32> = words.iter().map(|&w| w as i32).collect();
        Tensor::from_slice_i32(&v, &[v.len().max(1)], dev).unwrap()
    }

    fn read(t: &Tensor) -> Vec<u32> {
        t.to_vec_i32().unwrap().iter().map(|&v| v as u32).collect()
    }

    #[test]
    fn requantization_rounds_half_to_even_in_integers() {
        // 2^-1 multiplier: mult 2^30, shift 31.
        let (m, s) = multiplier("t", 0.5).unwrap();
        assert_eq!((m, s), (1 << 30, 31));
        let r = |acc| requantize(acc, m, s, 0, -128);
        assert_eq!([r(1), r(3), r(5), r(-3), r(-5), r(7)], [0, 2, 2, -2, -2, 4]);
        assert_eq!(requantize(1000, m, s, 10, -128), 127);
        assert_eq!(requantize(-1000, m, s, 10, -128), -128);
        assert_eq!(requantize(-9, m, s, 3, 3), 3); // relu at the zero point
        assert!(multiplier("t", 0.0).is_err() && multiplier("t", f64::NAN).is_err());
        for v in [1e-9, 0.3, 1.0, 7.5, 1000.0] {
            let (m, s) = multiplier("t", v).unwrap();
            assert!(
                (m as f64 / 2f64.powi(s as i32) / v - 1.0).abs() < 1e-9,
                "{v}"
            );
            assert!((1 << 30..1 << 31).contains(&m));
        }
    }

    /// Every shape, both dot-product paths, both output modes: the GPU's integers equal the
    /// CPU's bit for bit.
    #[test]
    fn qgemm_equals_the_integer_reference_bit_for_bit() {
        let dev = Device::default_device().unwrap();
        let mut rng = Lcg(7);
        let mut ties = 0;
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 3, 7),
            (13, 17, 33),
            (4, 8, 16),
            (9, 6, 130),
            (64, 10, 256),
        ] {
            // Small values in the smaller shapes keep their results inside int8, where the
            // requantization's rounding shows; full-range values elsewhere.
            let small = k <= 33;
            let val = |rng: &mut Lcg| {
                if small {
                    (rng.next() % 9) as i8 - 4
                } else {
                    rng.i8()
                }
            };
            let a: Vec<i8> = (0..m * k).map(|_| val(&mut rng)).collect();
            let w: Vec<i8> = (0..n * k).map(|_| val(&mut rng)).collect();
            let za = if small {
                (rng.next() % 9) as i32 - 4
            } else {
                (rng.next() % 256) as i32 - 128
            };
            let span = if small { 101 } else { 20001 };
            let bias: Vec<i32> = (0..n)
                .map(|_| (rng.next() % span) as i32 - span as i32 / 2)
                .collect();
            // The zero-point correction folded into the bias: sum (a - za) w = a.w - za sum w.
            let folded: Vec<i32> = (0..n)
                .map(|c| {
                    bias[c] - za * w[c * k..(c + 1) * k].iter().map(|&v| v as i32).sum::<i32>()
                })
                .collect();
            let acc = |r: usize, c: usize| -> i32 {
                (0..k)
                    .map(|i| (a[r * k + i] as i32 - za) * w[c * k + i] as i32)
                    .sum::<i32>()
                    + bias[c]
            };
            let k4 = padded_words(k);
            let (at, bt) = (
                upload(&pack_rows(&a, k, k4, za as i8), &dev),
                upload(&pack_rows(&w, k, k4, 0), &dev),
            );
            let shape = QShape {
                m,
                n,
                k4,
                ohw: 0,
                window: None,
            };
            let scales: Vec<f32> = (0..n).map(|c| 1e-3 * (1.0 + c as f32)).collect();
            // Odd channels have power-of-two multipliers, whose products often tie.
            let mults: Vec<(u32, u32)> = scales
                .iter()
                .enumerate()
                .map(|(c, &s)| {
                    let m = if c % 2 == 1 {
                        0.5f64.powi(c as i32 % 3 + 1)
                    } else {
                        s as f64 * 0.37
                    };
                    multiplier("t", m).unwrap()
                })
                .collect();
            let zy = (rng.next() % 41) as i32 - 20;
            for manual in [false, true] {
                // f32 out, without and with relu: one conversion and one product, exact.
                for act in [None, Some((UnaryOp::Relu, 0.0))] {
                    let out = QOut::F32 { act };
                    let bias: Vec<u32> = folded.iter().map(|&b| b as u32).collect();
                    let bits: Vec<u32> = scales.iter().map(|s| s.to_bits()).collect();
                    let c = upload(&channel_words(&[&bias, &bits], &out), &dev);
                    let y = qgemm(&at, &bt, &c, &shape, out, manual).unwrap();
                    let got: Vec<u32> = y.to_vec().unwrap().iter().map(|v| v.to_bits()).collect();
                    for r in 0..m {
                        for col in 0..n {
                            let mut want = acc(r, col) as f32 * scales[col];
                            if act.is_some() {
                                want = want.max(0.0);
                            }
                            assert_eq!(
                                got[r * n + col],
                                want.to_bits(),
                                "f32 ({m},{n},{k}) [{r},{col}] manual {manual}"
                            );
                        }
                    }
                }
                for relu in [false, true] {
                    let out = QOut::I8 { zy, relu };
                    let bias: Vec<u32> = folded.iter().map(|&b| b as u32).collect();
                    let mult: Vec<u32> = mults.iter().map(|m| m.0).collect();
                    let shift: Vec<u32> = mults.iter().map(|m| m.1).collect();
                    let c = upload(&channel_words(&[&bias, &mult, &shift], &out), &dev);
                    let y = qgemm(&at, &bt, &c, &shape, out, manual).unwrap();
                    let got = read(&y);
                    let nw = padded_words(n);
                    for r in 0..m {
                        for col in 0..nw * 4 {
                            let byte =
                                (got[r * nw + col / 4] >> (8 * (col % 4))) as u8 as i8 as i32;
                            let want = if col < n {
                                requantize(
                                    acc(r, col),
                                    mults[col].0,
                                    mults[col].1,
                                    zy,
                                    if relu { zy } else { -128 },
                                )
                            } else {
                                zy // padding holds the zero point
                            };
                            assert_eq!(
                                byte, want,
                                "i8 ({m},{n},{k}) [{r},{col}] manual {manual} relu {relu}"
                            );
                            if col < n {
                                let (mu, sh) = mults[col];
                                let mag = acc(r, col).unsigned_abs() as u64 * mu as u64;
                                let q = (zy as i64 + (mag >> sh) as i64).abs();
                                ties +=
                                    (mag & ((1 << sh) - 1) == 1 << (sh - 1) && q < 120) as usize;
                            }
                        }
                    }
                }
            }
        }
        // Ties reach the requantization, so its half-to-even rule is checked.
        assert!(ties >= 4, "{ties} ties");
    }

    /// A quantized convolution (patch rows then the product of rows, or the product through
    /// the window over quantized pixels, with and without the built-in, written as NCHW)
    /// equals an integer convolution on the CPU bit for bit, padding, stride and dilation
    /// included.
    #[test]
    fn quantized_convolution_equals_the_integer_reference() {
        use crate::ops::conv::conv2d_geometry;
        let dev = Device::default_device().unwrap();
        let mut rng = Lcg(11);
        // Inputs on the quantization grid (a power-of-two scale), so quantizing is exact.
        let q = QParams {
            scale: 0.25,
            zero_point: 3,
        };
        for (n, c, h, w, co, k, stride, pad, dil) in [
            (1, 1, 5, 5, 1, 3, 1, 1, 1),
            (2, 3, 7, 6, 5, 3, 2, 1, 1),
            (3, 5, 6, 9, 4, 2, 1, 0, 2),
            (2, 16, 8, 8, 32, 3, 1, 1, 1),
        ] {
            let xq: Vec<i32> = (0..n * c * h * w)
                .map(|_| (rng.next() % 256) as i32 - 128)
                .collect();
            let x: Vec<f32> = xq.iter().map(|&v| q.dequantize(v as i8)).collect();
            let kk = c * k * k;
            let wq: Vec<i8> = (0..co * kk).map(|_| rng.i8()).collect();
            let opts = crate::Conv2dOptions {
                stride: [stride; 2],
                padding: [pad; 2],
                dilation: [dil; 2],
                groups: 1,
            };
            let g = conv2d_geometry(&[n, c, h, w], &[co, c, k, k], &opts).unwrap();
            let xt = Tensor::from_slice(&x, &[n, c, h, w], &dev).unwrap();
            let wsum: Vec<i32> = (0..co)
                .map(|o| wq[o * kk..(o + 1) * kk].iter().map(|&v| v as i32).sum())
                .collect();
            let folded: Vec<i32> = wsum.iter().map(|s| -q.zero_point * s).collect();
            let scales: Vec<u32> = (0..co).map(|o| (0.5f32 + o as f32).to_bits()).collect();
            let bias: Vec<u32> = folded.iter().map(|&b| b as u32).collect();
            let ch = upload(
                &channel_words(&[&bias, &scales], &QOut::F32 { act: None }),
                &dev,
            );
            let ohw = g.oh * g.ow;
            // Patch rows, then the product of rows.
            let patches = quantize_im2col(&xt, &g, q).unwrap();
            let rows_w = upload(&pack_rows(&wq, kk, padded_words(kk), 0), &dev);
            let by_rows = QShape {
                m: n * ohw,
                n: co,
                k4: padded_words(kk),
                ohw,
                window: None,
            };
            // The padded pixels, then the product over the window; weights taps outermost.
            let pixels = quantize_nhwc(&xt, q).unwrap();
            let taps = k * k;
            let mut wt = vec![0i8; wq.len()];
            for o in 0..co {
                for ci in 0..c {
                    for t in 0..taps {
                        wt[(o * taps + t) * c + ci] = wq[(o * c + ci) * taps + t];
                    }
                }
            }
            let win_w = upload(&pack_rows(&wt, c, padded_words(c), 0), &dev);
            let by_window = QShape {
                m: n * ohw,
                n: co,
                k4: padded_words(c),
                ohw,
                window: Some(QWindow {
                    kernel: [k; 2],
                    stride: [stride; 2],
                    padding: [pad; 2],
                    dilation: [dil; 2],
                    grid: [h, w],
                    zero_point: q.zero_point,
                }),
            };
            for (label, a, b, shape, manual) in [
                ("rows", &patches, &rows_w, by_rows, false),
                ("window", &pixels, &win_w, by_window, false),
                ("window, by hand", &pixels, &win_w, by_window, true),
            ] {
                let y = qgemm(a, b, &ch, &shape, QOut::F32 { act: None }, manual)
                    .unwrap()
                    .to_vec()
                    .unwrap();
                for b in 0..n {
                    for o in 0..co {
                        for oy in 0..g.oh {
                            for ox in 0..g.ow {
                                let mut acc = 0i32;
                                for ci in 0..c {
                                    for ky in 0..k {
                                        for kx in 0..k {
                                            let iy = (oy * stride + ky * dil) as i64 - pad as i64;
                                            let ix = (ox * stride + kx * dil) as i64 - pad as i64;
                                            if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64
                                            {
                                                continue; // the real 0 contributes nothing
                                            }
                                            let xv = xq[((b * c + ci) * h + iy as usize) * w
                                                + ix as usize];
                                            acc += (xv - q.zero_point)
                                                * wq[o * kk + (ci * k + ky) * k + kx] as i32;
                                        }
                                    }
                                }
                                let want = acc as f32 * f32::from_bits(scales[o]);
                                let got = y[((b * co + o) * g.oh + oy) * g.ow + ox];
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{label} {g:?} at {b},{o},{oy},{ox}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Activations quantized at run time: the GPU's scale and zero point are the host's
    /// formula on the tensor's range, and the product equals the integer reference (then one
    /// f32 scale and bias).
    #[test]
    fn dynamic_quantization_uses_the_batch_range() {
        let dev = Device::default_device().unwrap();
        let mut rng = Lcg(5);
        let (m, n, k) = (7, 5, 13);
        let x: Vec<f32> = (0..m * k)
            .map(|_| (rng.next() % 2001) as f32 / 500.0 - 1.5)
            .collect();
        let (mn, mx) = x
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let t = Tensor::from_slice(&x, &[m, k], &dev).unwrap();
        let words_t = quantize_rows_dynamic(&t, k).unwrap();
        let got = read(&words_t);
        let (sa, za) = (f32::from_bits(got[0]), got[1] as i32);
        let host = QParams::asymmetric(mn, mx).unwrap();
        assert!(
            (sa - host.scale).abs() <= host.scale * 1e-6,
            "{sa} vs {}",
            host.scale
        );
        assert_eq!(za, host.zero_point);
        let wq: Vec<i8> = (0..n * k).map(|_| rng.i8()).collect();
        let sw: Vec<f32> = (0..n).map(|c| 0.01 * (c + 1) as f32).collect();
        let bias: Vec<f32> = (0..n).map(|c| c as f32 - 2.0).collect();
        let wsum: Vec<i32> = (0..n)
            .map(|c| wq[c * k..(c + 1) * k].iter().map(|&v| v as i32).sum())
            .collect();
        let ch = channel_words(
            &[
                &wsum.iter().map(|&v| v as u32).collect::<Vec<_>>(),
                &sw.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                &bias.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            ],
            &QOut::Dynamic { act: None },
        );
        let k4 = padded_words(k);
        let wt = upload(&pack_rows(&wq, k, k4, 0), &dev);
        let shape = QShape {
            m,
            n,
            k4,
            ohw: 0,
            window: None,
        };
        let y = qgemm(
            &words_t,
            &wt,
            &upload(&ch, &dev),
            &shape,
            QOut::Dynamic { act: None },
            false,
        )
        .unwrap()
        .to_vec()
        .unwrap();
        for r in 0..m {
            for c in 0..n {
                let mut acc = 0i32;
                for i in 0..k {
                    let q = (got[4 + r * k4 + i / 4] >> (8 * (i % 4))) as u8 as i8 as i32;
                    // Division on the GPU may round the other way at a tie: one step.
                    let hq = QParams {
                        scale: sa,
                        zero_point: za,
                    }
                    .quantize(x[r * k + i]) as i32;
                    assert!((q - hq).abs() <= 1, "{q} vs {hq}");
                    acc += (q - za) * wq[c * k + i] as i32;
                }
                let want = acc as f32 * (sa * sw[c]) + bias[c];
                let e = (y[r * n + c] - want).abs();
                assert!(
                    e <= 1e-5 * want.abs().max(1.0),
                    "[{r},{c}] {} vs {want}",
                    y[r * n + c]
                );
            }
        }
    }

    /// Operands that are views (an expand stretching one word, an offset) are refused
    /// before the kernel indexes past their buffers.
    #[test]
    fn qgemm_refuses_views_of_small_buffers() {
        let dev = Device::default_device().unwrap();
        let one = upload(&[7], &dev);
        let wide = one.reshape(&[1, 1]).unwrap().expand(&[4096, 1]).unwrap();
        let w = upload(&[1; 16], &dev);
        let c = upload(&[0; 16], &dev);
        let shape = |m| QShape {
            m,
            n: 4,
            k4: 4,
            ohw: 0,
            window: None,
        };
        let f32_out = QOut::F32 { act: None };
        let e = qgemm(&wide, &w, &c, &shape(1024), f32_out, false);
        assert!(e.is_err_and(|e| e.to_string().contains("dense i32 words")));
        let shifted = upload(&[1; 8], &dev).narrow(0, 4, 4).unwrap();
        assert!(qgemm(&shifted, &w, &c, &shape(1), f32_out, false).is_err());
        // Too few words for the rows, and a window that does not fit its grid.
        let four = upload(&[1; 4], &dev);
        assert!(qgemm(&four, &w, &c, &shape(2), f32_out, false).is_err());
        let win = QShape {
            window: Some(QWindow {
                kernel: [3, 3],
                stride: [1, 1],
                padding: [0, 0],
                dilation: [1, 1],
                grid: [2, 2],
                zero_point: 0,
            }),
            ..shape(1)
        };
        assert!(qgemm(&four, &w, &c, &win, f32_out, false).is_err());
    }

    #[test]
    fn quantize_and_dequantize_kernels_match_the_host() {
        let dev = Device::default_device().unwrap();
        let q = QParams::asymmetric(-1.3, 2.1).unwrap();
        let (rows, count) = (3, 7);
        let x: Vec<f32> = (0..rows * count)
            .map(|i| (i as f32 * 0.173).sin() * 2.0)
            .collect();
        let mut x2 = x.clone();
        x2[5] = 50.0; // saturates
        x2[6] = f32::NAN;
        let t = Tensor::from_slice(&x2, &[rows, count], &dev).unwrap();
        let words_t = quantize_rows(&t, count, q).unwrap();
        let got = read(&words_t);
        let host: Vec<i8> = x2.iter().map(|&v| q.quantize(v)).collect();
        let want = pack_rows(&host, count, padded_words(count), q.zero_point as i8);
        // Division on the GPU may differ from the host's in the last bit: one step at most.
        let mut exact = 0;
        for (g, w) in got.iter().zip(&want) {
            for i in 0..4 {
                let (a, b) = ((g >> (8 * i)) as u8 as i8, (w >> (8 * i)) as u8 as i8);
                assert!((a as i32 - b as i32).abs() <= 1, "{a} vs {b}");
                exact += (a == b) as usize;
            }
        }
        assert!(exact >= want.len() * 4 - 1, "{exact} exact");
        let back = dequantize_rows(&words_t, rows, count, padded_words(count), q)
            .unwrap()
            .to_vec()
            .unwrap();
        for (i, (&b, &h)) in back.iter().zip(&host).enumerate() {
            let want = q.dequantize(h);
            assert!((b - want).abs() <= q.scale * 1.001, "{i}: {b} vs {want}");
        }
        assert!(quantize_rows(&t, 4, q).is_err());
    }
}
