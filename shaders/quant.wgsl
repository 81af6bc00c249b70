// Int8 kernels: quantization, dequantization, and the integer matrix product of quantized
// linear layers (src/ops/quant.rs). Int8 values are packed four to a u32, lowest byte first,
// along the reduction axis; rows are padded to whole words (the padding of a weight row is 0,
// so padded positions add nothing to a dot product).
//
// Bindings:
//   quantize_fwd:   a (0) = x, f32 bits, (rows, count) contiguous; out (3) = q, (rows, k4)
//                   words: saturate(round_half_even(x / scale) + zp), padding = zp
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
//   qgemm_fwd:      a (0) = activations (m, k4) words; b (1) = weights (k4, n) words
//                   (word-major, so that neighbouring channels read neighbouring words);
//                   c (2) = per output channel, 3 words: the i32 bias (with the zero-point
//                   correction folded in), then the f32 scale (mode 0) or the requantization
//                   multiplier (mode 1), then the shift (mode 1);
//                   out (3) = mode 0: f32 bits (m, n); mode 1: int8 (m, n_words) words
//   p (4): QuantParams (src/ops/quant.rs)
//
// qgemm_fwd: acc = sum_k a[r, k] * b[c, k] + bias[c] in i32 (exact), then
//   mode 0: y = f32(acc) * scale[c], then the activation p.act (if p.act_on) in f32;
//   mode 1: q = clamp(zy + round_half_even(acc * mult[c] / 2^shift[c]), lo, 127), in integer
//           arithmetic (a 64-bit product from 16-bit halves), so every adapter gives the same
//           bits; a fused relu is lo = zy.
// Each invocation computes a 4 x 4 block: rows 4 gid.y.., channels 4 gid.x...

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
    manual: u32,
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
    _pad0: u32,
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

// Word `word` of row `row` of x (rows of p.count f32 values), quantized and packed; columns
// past the row hold the zero point.
fn pack_row_word(row: u32, word: u32, scale: f32, zp: i32) -> u32 {
    var packed = 0u;
    for (var i = 0u; i < 4u; i += 1u) {
        let col = word * 4u + i;
        var q = zp;
        if (col < p.count) {
            q = quantize_with(bitcast<f32>(a[row * p.count + col]), scale, zp);
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
    out[t] = pack_row_word(t / p.k4, t % p.k4, p.scale, p.zp);
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
    out[4u + t] = pack_row_word(t / p.k4, t % p.k4, sz.x, zp);
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

@compute @workgroup_size(8, 8)
fn qgemm_fwd(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let col0 = gid.x * 4u;
    // Row blocks past 65535 workgroups continue along z.
    let row0 = (gid.y + gid.z * nwg.y * 8u) * 4u;
    if (row0 >= p.m || col0 >= p.n) {
        return;
    }
    var acc: array<vec4<i32>, 4>;
    // Mode 2 (dynamic): the activations' scale and zero point head the activation words.
    let a0 = select(0u, 4u, p.mode == 2u);
    for (var k = 0u; k < p.k4; k += 1u) {
        var bw: vec4<u32>;
        for (var j = 0u; j < 4u; j += 1u) {
            let cj = min(col0 + j, p.n - 1u);
            bw[j] = b[k * p.n + cj];
        }
        if (p.manual != 0u) {
            // By hand: each weight word unpacked once, reused by the four rows.
            let w0 = unpack4(bw.x);
            let w1 = unpack4(bw.y);
            let w2 = unpack4(bw.z);
            let w3 = unpack4(bw.w);
            for (var i = 0u; i < 4u; i += 1u) {
                let ri = min(row0 + i, p.m - 1u);
                let x = unpack4(a[a0 + ri * p.k4 + k]);
                acc[i] += vec4<i32>(dot(x, w0), dot(x, w1), dot(x, w2), dot(x, w3));
            }
        } else {
            for (var i = 0u; i < 4u; i += 1u) {
                let ri = min(row0 + i, p.m - 1u);
                let aw = a[a0 + ri * p.k4 + k];
                acc[i] += vec4<i32>(dot4I8Packed(aw, bw.x), dot4I8Packed(aw, bw.y),
                    dot4I8Packed(aw, bw.z), dot4I8Packed(aw, bw.w));
            }
        }
    }
    for (var i = 0u; i < 4u; i += 1u) {
        let r = row0 + i;
        if (r >= p.m) {
            break;
        }
        var packed = 0u;
        for (var j = 0u; j < 4u; j += 1u) {
            let col = col0 + j;
            var q = p.zy;
            if (col < p.n) {
                let total = acc[i][j] + bitcast<i32>(c[col * 3u]);
                if (p.mode != 1u) {
                    var y = f32(total) * bitcast<f32>(c[col * 3u + 1u]);
                    if (p.mode == 2u) {
                        // c: the weight row's sum, its scale, the f32 bias.
                        let sa = bitcast<f32>(a[0]);
                        let za = bitcast<i32>(a[1]);
                        let t = acc[i][j] - za * bitcast<i32>(c[col * 3u]);
                        y = f32(t) * (sa * bitcast<f32>(c[col * 3u + 1u])) + bitcast<f32>(c[col * 3u + 2u]);
                    }
                    if (p.act_on != 0u) {
                        y = unary_op(p.act, y, p.alpha, 0.0);
                    }
                    if (p.ohw == 0u) {
                        out[r * p.n_words + col] = bitcast<u32>(y);
                    } else {
                        out[((r / p.ohw) * p.n + col) * p.ohw + r % p.ohw] = bitcast<u32>(y);
                    }
                } else {
                    q = requantize(total, c[col * 3u + 1u], c[col * 3u + 2u]);
                }
            }
            packed |= (bitcast<u32>(q) & 0xffu) << (8u * j);
        }
        if (p.mode == 1u) {
            out[r * p.n_words + col0 / 4u] = packed;
        }
    }
}
