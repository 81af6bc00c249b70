// Int8 kernels: quantization, dequantization, and the integer matrix product of quantized
// linear layers and convolutions (src/ops/quant.rs). Int8 values are packed four to a u32,
// lowest byte first, along the reduction axis; rows are padded to whole groups of 16 values
// (k4, a multiple of 4 words), so that the product reads vec4s. The padding of a weight row
// is 0, so padded positions add nothing to a dot product.
//
// Bindings:
//   quantize_fwd:   a (0) = x, f32 bits, (n, c, h, w) contiguous (rows: h = w = 1);
//                   out (3) = its pixels, (n h w, k4) words, channels innermost:
//                   saturate(round_half_even(x / scale) + zp), channels past c = zp
//   dequantize_fwd: a (0) = q, (rows, k4) words; out (3) = scale * (q - zp), f32 bits,
//                   (rows, count)
//   quantize_im2col_fwd: a (0) = x, f32 bits, (n, c, h, w); b (1) = per tap k: channel
//                   offset c h w, ky dh, kx dw; out (3) = the quantized patch
//                   rows of a convolution, (n * oh * ow, k4) words over k = c * kh * kw in the
//                   weight's (c, ky, kx) order; taps in the padding hold zp (the real 0)
//   quantize_dyn_fwd: a (0) = x, f32 bits, (rows, count); b (1) = its [min, max] (f32 bits);
//                   out (3) = 4 header words (the scale's f32 bits, the zero point, 0, 0),
//                   then q as quantize_fwd writes it, with the scale and zero point of
//                   [min, max] computed here as QParams::asymmetric does (in f32)
//   qgemm_fwd (and _act_, _manual_): a4 (0) = activations, rows of k4 words: plain rows
//                   (m, k4), or the pixels (n h w, k4) of a convolution's input (p.h, p.w
//                   its grid; p.kh.. the window, p.ph/p.pw its padding, where taps read the
//                   zero point p.zp); b4 (1) = weights (n, taps k4) words, taps outermost;
//                   c4 (2) = per output channel, planes of p.plane words: the i32
//                   bias (with the zero-point correction folded in), the f32 scale (modes
//                   0, 2) or the requantization multiplier (mode 1), then in modes 1 and 2
//                   the shift or the f32 bias; out4 (3) = mode 0, 2: f32 bits, (m, n) or NCHW
//                   (p.ohw > 0); mode 1: int8 rows (m, n_words) words
//   p (4): QuantParams (src/ops/quant.rs)
//
// qgemm: acc = sum_k a[r, k] * b[c, k] + bias[c] in i32 (exact), then
//   mode 0: y = f32(acc) * scale[c], then the activation p.act (if p.act_on) in f32;
//   mode 1: q = clamp(zy + round_half_even(acc * mult[c] / 2^shift[c]), lo, 127), in integer
//           arithmetic (a 64-bit product from 16-bit halves), so every adapter gives the same
//           bits; a fused relu is lo = zy;
//   mode 2: activations quantized at run time, their scale and zero point in a4[0].
// Each invocation computes 4 rows by 8 channels; on software adapters every storage access
// is a loop over the SIMD lanes, so the loads are vec4s of 16 int8 values.

struct Params {
    m: u32,
    n: u32,
    k4: u32,
    n_words: u32,
    mode: u32,
    act: u32,
    act_on: u32,
    zy: i32,
    lo: i32,
    _pad2: u32,
    alpha: f32,
    scale: f32,
    zp: i32,
    count: u32,
    rows: u32,
    // Convolution geometry (quantize_im2col_fwd), and the output layout of qgemm_fwd:
    // ohw = 0 writes (m, n) rows; ohw > 0 writes (m / ohw, n, ohw), a convolution's NCHW.
    ohw: u32,
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    plane: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> a: array<u32>;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read> c: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

// Byte i of w, sign-extended.
fn sbyte(w: u32, i: u32) -> i32 {
    return bitcast<i32>(w << (24u - 8u * i)) >> 24u;
}

// The four int8 values of a word, sign-extended.
fn unpack4(w: u32) -> vec4<i32> {
    return vec4<i32>(sbyte(w, 0u), sbyte(w, 1u), sbyte(w, 2u), sbyte(w, 3u));
}

// saturate(round_half_even(x / scale) + zp); NaN gives the zero point.
fn quantize_with(x: f32, scale: f32, zp: i32) -> i32 {
    if (is_nan(x)) {
        return clamp(zp, -128, 127);
    }
    return i32(clamp(round(x / scale) + f32(zp), -128.0, 127.0));
}

fn quantize_one(x: f32) -> i32 {
    return quantize_with(x, p.scale, p.zp);
}

// Word `word` (channels 4 word..) of pixel `pix` of x, quantized and packed. x is
// (n, p.c, p.h, p.w) f32; channels past p.c hold the zero point. Rows of x are the case
// h = w = 1.
fn pack_pixel_word(pix: u32, word: u32, scale: f32, zp: i32) -> u32 {
    let hw = p.h * p.w;
    let img = pix / hw;
    let at = img * p.c * hw + pix % hw;
    var packed = 0u;
    for (var i = 0u; i < 4u; i += 1u) {
        let ch = word * 4u + i;
        var q = zp;
        if (ch < p.c) {
            q = quantize_with(bitcast<f32>(a[at + ch * hw]), scale, zp);
        }
        packed |= (bitcast<u32>(q) & 0xffu) << (8u * i);
    }
    return packed;
}

@compute @workgroup_size(256)
fn quantize_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (t >= p.rows * p.k4) {
        return;
    }
    out[t] = pack_pixel_word(t / p.k4, t % p.k4, p.scale, p.zp);
}

@compute @workgroup_size(256)
fn dequantize_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (t >= p.rows * p.count) {
        return;
    }
    let row = t / p.count;
    let col = t % p.count;
    let q = sbyte(a[row * p.k4 + col / 4u], col % 4u);
    out[t] = bitcast<u32>(p.scale * f32(q - p.zp));
}

@compute @workgroup_size(256)
fn quantize_im2col_fwd(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (t >= p.rows * p.k4) {
        return;
    }
    let row = t / p.k4;
    let word = t % p.k4;
    let ox = row % p.ow;
    let oy = (row / p.ow) % p.oh;
    let img = row / (p.ow * p.oh);
    // The window's top-left corner, shifted by the padding so that it is never negative.
    let y0 = oy * p.sh;
    let x0 = ox * p.sw;
    let base = img * p.c * p.h * p.w;
    var packed = 0u;
    for (var i = 0u; i < 4u; i += 1u) {
        let kk = word * 4u + i;
        var q = p.zp;
        if (kk < p.count) {
            // Tap kk's offsets, from the table in binding 1: channel plane start, then the
            // tap's row and column within the window (dilation applied).
            let ch = b[kk * 3u];
            let iy = y0 + b[kk * 3u + 1u];
            let ix = x0 + b[kk * 3u + 2u];
            if (iy >= p.ph && ix >= p.pw && iy - p.ph < p.h && ix - p.pw < p.w) {
                q = quantize_one(bitcast<f32>(a[base + ch + (iy - p.ph) * p.w + ix - p.pw]));
            }
        }
        packed |= (bitcast<u32>(q) & 0xffu) << (8u * i);
    }
    out[t] = packed;
}

// Scale and zero point of the range [mn, mx], asymmetric int8 (ONNX Runtime's formula, in f32).
fn dyn_params(mn: f32, mx: f32) -> vec2<f32> {
    let lo = min(mn, 0.0);
    let hi = max(mx, 0.0);
    let scale = (hi - lo) / 255.0;
    if (!(scale >= 1.17549435e-38)) {
        return vec2<f32>(1.0, 0.0);
    }
    return vec2<f32>(scale, clamp(round(-128.0 - lo / scale), -128.0, 127.0));
}

@compute @workgroup_size(256)
fn quantize_dyn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    let sz = dyn_params(bitcast<f32>(b[0]), bitcast<f32>(b[1]));
    let zp = i32(sz.y);
    if (t == 0u) {
        out[0] = bitcast<u32>(sz.x);
        out[1] = bitcast<u32>(zp);
        out[2] = 0u;
        out[3] = 0u;
    }
    if (t >= p.rows * p.k4) {
        return;
    }
    out[4u + t] = pack_pixel_word(t / p.k4, t % p.k4, sz.x, zp);
}

// The 64-bit product of a and m as (low word, high word).
fn mul_wide(x: u32, m: u32) -> vec2<u32> {
    let x0 = x & 0xffffu;
    let x1 = x >> 16u;
    let m0 = m & 0xffffu;
    let m1 = m >> 16u;
    let p00 = x0 * m0;
    let p01 = x0 * m1;
    let p10 = x1 * m0;
    let p11 = x1 * m1;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let lo = (p00 & 0xffffu) | (mid << 16u);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(lo, hi);
}

// v / 2^s rounded half to even, for 1 <= s <= 63, saturated to u32.
fn shift_round(v: vec2<u32>, s: u32) -> u32 {
    var q: u32;
    var rem: vec2<u32>;
    var half: vec2<u32>;
    if (s >= 32u) {
        let t = s - 32u;
        q = v.y >> t;
        rem = vec2<u32>(v.x, select(v.y & ((1u << t) - 1u), 0u, t == 0u));
        half = select(vec2<u32>(0u, 1u << (t - 1u)), vec2<u32>(0x80000000u, 0u), t == 0u);
    } else {
        if ((v.y >> s) != 0u) {
            return 0xffffffffu;
        }
        q = (v.x >> s) | (v.y << (32u - s));
        rem = vec2<u32>(v.x & ((1u << s) - 1u), 0u);
        half = vec2<u32>(1u << (s - 1u), 0u);
    }
    let above = rem.y > half.y || (rem.y == half.y && rem.x > half.x);
    let tie = rem.y == half.y && rem.x == half.x;
    if ((above || (tie && (q & 1u) == 1u)) && q != 0xffffffffu) {
        q += 1u;
    }
    return q;
}

fn requantize(acc: i32, mult: u32, shift: u32) -> i32 {
    // |acc| as u32 (wrapping makes |i32::MIN| = 2^31).
    let mag = select(bitcast<u32>(acc), bitcast<u32>(0 - acc), acc < 0);
    let r = min(shift_round(mul_wide(mag, mult), shift), 0x7fffffffu);
    let signed = select(i32(r), -i32(r), acc < 0);
    return clamp(p.zy + clamp(signed, -65536, 65536), p.lo, 127);
}

@group(0) @binding(0) var<storage, read> a4: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> b4: array<vec4<u32>>;

// The dot product of 16 int8 pairs, packed in four words each.
fn dot16(x: vec4<u32>, y: vec4<u32>, manual: bool) -> i32 {
    if (manual) {
        return dot(unpack4(x.x), unpack4(y.x)) + dot(unpack4(x.y), unpack4(y.y))
            + dot(unpack4(x.z), unpack4(y.z)) + dot(unpack4(x.w), unpack4(y.w));
    }
    return dot4I8Packed(x.x, y.x) + dot4I8Packed(x.y, y.y) + dot4I8Packed(x.z, y.z)
        + dot4I8Packed(x.w, y.w);
}

// One activation vec4 against four channels' vec4s.
fn dots4(x: vec4<u32>, w0: vec4<u32>, w1: vec4<u32>, w2: vec4<u32>, w3: vec4<u32>,
         manual: bool) -> vec4<i32> {
    return vec4<i32>(dot16(x, w0, manual), dot16(x, w1, manual), dot16(x, w2, manual),
        dot16(x, w3, manual));
}

// Where output row r's window starts: rows are output positions (img, oy, ox) of an
// (oh, ow) grid over input pixels of (p.h, p.w), p.k4 words each. x: the vec4 index of the
// image's first pixel; y, z: the window's top-left corner, in coordinates shifted by the
// padding (p.ph, p.pw) so that they are never negative.
fn row_origin(r: u32) -> vec3<u32> {
    let ox = r % p.ow;
    let oy = (r / p.ow) % p.oh;
    let img = r / (p.ow * p.oh);
    let base = img * p.h * p.w * (p.k4 / 4u) + select(0u, 1u, p.mode == 2u);
    return vec3<u32>(base, oy * p.sh, ox * p.sw);
}

// The vec4 offset of tap (ty, tx) (dilation applied) of a window at `o`, and whether the
// tap is inside the image (outside, it reads the zero point: the real 0).
fn tap_at(o: vec3<u32>, ty: u32, tx: u32) -> vec2<u32> {
    let yy = o.y + ty;
    let xx = o.z + tx;
    let inside = yy >= p.ph && xx >= p.pw && yy - p.ph < p.h && xx - p.pw < p.w;
    let pixel = select(0u, (yy - p.ph) * p.w + xx - p.pw, inside);
    return vec2<u32>(o.x + pixel * (p.k4 / 4u), u32(inside));
}

// Activation vec4 g of a tap, or the zero point's where the tap is in the padding.
fn tap_load(t: vec2<u32>, g: u32, zero: vec4<u32>) -> vec4<u32> {
    return select(zero, a4[t.x + g], t.y != 0u);
}

@group(0) @binding(2) var<storage, read> c4: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> out4: array<vec4<u32>>;

// One word of the output (the integer product writes through out4 alone).
fn put(at: u32, v: u32) {
    out4[at / 4u][at % 4u] = v;
}

// The channel data of channels col..col+3 (col a multiple of 4): planes of p.plane words
// (channel_layout in src/ops/quant.rs), the i32 bias, the scale's f32 bits or the
// requantization multiplier, and (modes 1 and 2) the shift or the f32 bias.
struct Chan4 {
    bias: vec4<i32>,
    mul: vec4<u32>,
    shift: vec4<u32>,
}

fn chan4(col: u32) -> Chan4 {
    let plane = p.plane / 4u;
    let i = col / 4u;
    var shift = vec4<u32>(0u);
    if (p.mode != 0u) {
        shift = c4[2u * plane + i];
    }
    return Chan4(bitcast<vec4<i32>>(c4[i]), c4[plane + i], shift);
}

// Requantized int8 of channels col..col+3, packed (channels past n hold zy).
fn requant4(v: vec4<i32>, col: u32, ch: Chan4) -> u32 {
    let total = v + ch.bias;
    var q = vec4<i32>(requantize(total.x, ch.mul.x, ch.shift.x),
        requantize(total.y, ch.mul.y, ch.shift.y), requantize(total.z, ch.mul.z, ch.shift.z),
        requantize(total.w, ch.mul.w, ch.shift.w));
    q = select(vec4<i32>(p.zy), q, vec4<u32>(col) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.n));
    let b = bitcast<vec4<u32>>(q) & vec4<u32>(0xffu);
    return b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
}

// The f32 results of modes 0 and 2, activation applied: relu only, unless `general` (each
// inlined copy of unary_op costs time on software adapters even where it is not taken).
fn finish4(v: vec4<i32>, ch: Chan4, general: bool) -> vec4<f32> {
    var y = vec4<f32>(v + ch.bias) * bitcast<vec4<f32>>(ch.mul);
    if (p.mode == 2u) {
        // c: the weight row's sum, its scale, the f32 bias; the activations' scale and zero
        // point head their words.
        let sa = bitcast<f32>(a4[0].x);
        let za = bitcast<i32>(a4[0].y);
        let t = v - za * ch.bias;
        y = vec4<f32>(t) * (sa * bitcast<vec4<f32>>(ch.mul)) + bitcast<vec4<f32>>(ch.shift);
    }
    if (p.act_on != 0u) {
        if (!general) {
            y = max(y, vec4<f32>(0.0)); // relu (the values are finite)
        } else {
            y = vec4<f32>(unary_op(p.act, y.x, p.alpha, 0.0), unary_op(p.act, y.y, p.alpha, 0.0),
                unary_op(p.act, y.z, p.alpha, 0.0), unary_op(p.act, y.w, p.alpha, 0.0));
        }
    }
    return y;
}

// Row r's f32 results for channels col..col+3, one at a time: (m, n) rows, or NCHW.
fn store_scalar4(r: u32, col: u32, y: vec4<f32>) {
    if (r >= p.m) {
        return;
    }
    var at = r * p.n + col;
    var stride = 1u;
    if (p.ohw != 0u) {
        at = ((r / p.ohw) * p.n + col) * p.ohw + r % p.ohw;
        stride = p.ohw;
    }
    for (var j = 0u; j < 4u && col + j < p.n; j += 1u) {
        put(at + j * stride, bitcast<u32>(y[j]));
    }
}

// Channel j's NCHW vec4 of four rows, when the channel exists.
fn store_rows4(at: u32, col: u32, v: vec4<f32>) {
    if (col < p.n) {
        out4[at / 4u] = bitcast<vec4<u32>>(v);
    }
}

// The epilogue of 4 rows (row0..) by 8 channels (col0..): y[row][half].
fn qgemm_epilogue(row0: u32, col0: u32, a0l: vec4<i32>, a0h: vec4<i32>, a1l: vec4<i32>,
                  a1h: vec4<i32>, a2l: vec4<i32>, a2h: vec4<i32>, a3l: vec4<i32>,
                  a3h: vec4<i32>, general: bool) {
    let cl = chan4(col0);
    let chh = chan4(col0 + 4u);
    if (p.mode == 1u) {
        let words = array<vec2<u32>, 4>(
            vec2<u32>(requant4(a0l, col0, cl), requant4(a0h, col0 + 4u, chh)),
            vec2<u32>(requant4(a1l, col0, cl), requant4(a1h, col0 + 4u, chh)),
            vec2<u32>(requant4(a2l, col0, cl), requant4(a2h, col0 + 4u, chh)),
            vec2<u32>(requant4(a3l, col0, cl), requant4(a3h, col0 + 4u, chh)));
        for (var i = 0u; i < 4u && row0 + i < p.m; i += 1u) {
            let at = (row0 + i) * p.n_words + col0 / 4u;
            put(at, words[i].x);
            put(at + 1u, words[i].y);
        }
        return;
    }
    let y0l = finish4(a0l, cl, general); let y0h = finish4(a0h, chh, general);
    let y1l = finish4(a1l, cl, general); let y1h = finish4(a1h, chh, general);
    let y2l = finish4(a2l, cl, general); let y2h = finish4(a2h, chh, general);
    let y3l = finish4(a3l, cl, general); let y3h = finish4(a3h, chh, general);
    if (p.ohw != 0u && p.ohw % 4u == 0u) {
        // NCHW with whole vec4s of positions: the four rows are neighbours in one image.
        let at = ((row0 / p.ohw) * p.n + col0) * p.ohw + row0 % p.ohw;
        let s = p.ohw;
        store_rows4(at, col0, vec4<f32>(y0l.x, y1l.x, y2l.x, y3l.x));
        store_rows4(at + s, col0 + 1u, vec4<f32>(y0l.y, y1l.y, y2l.y, y3l.y));
        store_rows4(at + 2u * s, col0 + 2u, vec4<f32>(y0l.z, y1l.z, y2l.z, y3l.z));
        store_rows4(at + 3u * s, col0 + 3u, vec4<f32>(y0l.w, y1l.w, y2l.w, y3l.w));
        store_rows4(at + 4u * s, col0 + 4u, vec4<f32>(y0h.x, y1h.x, y2h.x, y3h.x));
        store_rows4(at + 5u * s, col0 + 5u, vec4<f32>(y0h.y, y1h.y, y2h.y, y3h.y));
        store_rows4(at + 6u * s, col0 + 6u, vec4<f32>(y0h.z, y1h.z, y2h.z, y3h.z));
        store_rows4(at + 7u * s, col0 + 7u, vec4<f32>(y0h.w, y1h.w, y2h.w, y3h.w));
    } else if (p.ohw == 0u && p.n % 4u == 0u) {
        // (m, n) rows with whole vec4s of channels.
        let rows = array<vec4<f32>, 8>(y0l, y0h, y1l, y1h, y2l, y2h, y3l, y3h);
        for (var i = 0u; i < 4u && row0 + i < p.m; i += 1u) {
            let at = ((row0 + i) * p.n + col0) / 4u;
            out4[at] = bitcast<vec4<u32>>(rows[2u * i]);
            if (col0 + 4u < p.n) {
                out4[at + 1u] = bitcast<vec4<u32>>(rows[2u * i + 1u]);
            }
        }
    } else {
        store_scalar4(row0, col0, y0l); store_scalar4(row0, col0 + 4u, y0h);
        store_scalar4(row0 + 1u, col0, y1l); store_scalar4(row0 + 1u, col0 + 4u, y1h);
        store_scalar4(row0 + 2u, col0, y2l); store_scalar4(row0 + 2u, col0 + 4u, y2h);
        store_scalar4(row0 + 3u, col0, y3l); store_scalar4(row0 + 3u, col0 + 4u, y3h);
    }
}

// The integer product: acc[r, c] = sum over taps (ky, kx) and words of the tap's
// activations (the zero point in the padding) times b[c], i32, exact. Plain rows are the 1 x 1 window over a
// (m, 1) grid of 1 x 1 pixels. Each invocation computes 4 rows by 8 channels from vec4 loads.
fn qgemm_body(gid: vec3<u32>, nwg: vec3<u32>, manual: bool, general: bool) {
    let row0 = (gid.x + gid.z * nwg.x * 8u) * 4u;
    let col0 = gid.y * 8u;
    if (row0 >= p.m || col0 >= 4u * p.n_words) {
        return;
    }
    let c16 = p.k4 / 4u;
    let taps = p.kh * p.kw;
    let b_row = taps * c16;
    let o0 = row_origin(row0);
    let o1 = row_origin(min(row0 + 1u, p.m - 1u));
    let o2 = row_origin(min(row0 + 2u, p.m - 1u));
    let o3 = row_origin(min(row0 + 3u, p.m - 1u));
    let zero = vec4<u32>((bitcast<u32>(p.zp) & 0xffu) * 0x01010101u);
    let last = p.n - 1u;
    let q0 = min(col0, last) * b_row;
    let q1 = min(col0 + 1u, last) * b_row;
    let q2 = min(col0 + 2u, last) * b_row;
    let q3 = min(col0 + 3u, last) * b_row;
    let q4 = min(col0 + 4u, last) * b_row;
    let q5 = min(col0 + 5u, last) * b_row;
    let q6 = min(col0 + 6u, last) * b_row;
    let q7 = min(col0 + 7u, last) * b_row;
    var a0l = vec4<i32>(0); var a0h = vec4<i32>(0);
    var a1l = vec4<i32>(0); var a1h = vec4<i32>(0);
    var a2l = vec4<i32>(0); var a2h = vec4<i32>(0);
    var a3l = vec4<i32>(0); var a3h = vec4<i32>(0);
    for (var t = 0u; t < taps; t += 1u) {
        let ky = t / p.kw;
        let kx = t % p.kw;
        let t0 = tap_at(o0, ky * p.dh, kx * p.dw);
        let t1 = tap_at(o1, ky * p.dh, kx * p.dw);
        let t2 = tap_at(o2, ky * p.dh, kx * p.dw);
        let t3 = tap_at(o3, ky * p.dh, kx * p.dw);
        for (var g = 0u; g < c16; g += 1u) {
            let wk = t * c16 + g;
            let w0 = b4[q0 + wk];
            let w1 = b4[q1 + wk];
            let w2 = b4[q2 + wk];
            let w3 = b4[q3 + wk];
            let w4 = b4[q4 + wk];
            let w5 = b4[q5 + wk];
            let w6 = b4[q6 + wk];
            let w7 = b4[q7 + wk];
            let x0 = tap_load(t0, g, zero);
            a0l += dots4(x0, w0, w1, w2, w3, manual);
            a0h += dots4(x0, w4, w5, w6, w7, manual);
            let x1 = tap_load(t1, g, zero);
            a1l += dots4(x1, w0, w1, w2, w3, manual);
            a1h += dots4(x1, w4, w5, w6, w7, manual);
            let x2 = tap_load(t2, g, zero);
            a2l += dots4(x2, w0, w1, w2, w3, manual);
            a2h += dots4(x2, w4, w5, w6, w7, manual);
            let x3 = tap_load(t3, g, zero);
            a3l += dots4(x3, w0, w1, w2, w3, manual);
            a3h += dots4(x3, w4, w5, w6, w7, manual);
        }
    }
    qgemm_epilogue(row0, col0, a0l, a0h, a1l, a1h, a2l, a2h, a3l, a3h, general);
}

// Entry points: qgemm_fwd fuses no activation or relu; qgemm_act_fwd any activation;
// qgemm_manual_fwd any activation, without the dot-product built-in.
@compute @workgroup_size(8)
fn qgemm_fwd(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    qgemm_body(gid, nwg, false, false);
}

@compute @workgroup_size(8)
fn qgemm_act_fwd(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    qgemm_body(gid, nwg, false, true);
}

@compute @workgroup_size(8)
fn qgemm_manual_fwd(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    qgemm_body(gid, nwg, true, true);
}
