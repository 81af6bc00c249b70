// Pooling family over (n * c) planes of h x w, contiguous: max, average and adaptive average,
// forward and backward. Backward kernels run one invocation per input element and sum over
// the windows that contain it, so no atomics are needed and results are deterministic.
//
// Bindings:
//   pool2d_fwd:       a (0) = x (planes, h, w); out (3) = y (planes, oh, ow), and for max
//                     pooling the chosen index (iy * w + ix, as f32) p.idx_off elements later
//   max_pool2d_bwd:   a (0) = dy, b (1) = the forward output buffer (indices at p.idx_off);
//                     out (3) = dx
//   avg_pool2d_bwd:   a (0) = dy; out (3) = dx
//   p (4): PoolParams (src/ops/pool.rs)
//
// Modes (p.mode): 0 max, 1 average counting padding, 2 average over valid elements only,
// 3 adaptive average (window i spans floor(i h / oh) .. ceil((i + 1) h / oh)).

struct Params {
    planes: u32,
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
    mode: u32,
    idx_off: u32,
    // 1 when every element index is below 2^22: positions are split with float division
    // (div_below_2_22, all lanes at once on lavapipe) instead of integer division (lane by
    // lane).
    small: u32,
}

// Element types of the input and output buffers: f32, or f16 in the variants that src/kernels.rs
// derives from this file (arithmetic stays in f32).
alias IN = f32;
alias OUT = f32;

@group(0) @binding(0) var<storage, read> a: array<IN>;
@group(0) @binding(1) var<storage, read> b: array<IN>;
@group(0) @binding(3) var<storage, read_write> out: array<OUT>;
@group(0) @binding(4) var<uniform> p: Params;

const WG: u32 = 256u;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// k / d, in float arithmetic where p.small says that it is exact.
fn div_index(k: u32, d: u32) -> u32 {
    if (p.small != 0u) {
        return div_below_2_22(k, d);
    }
    return k / d;
}

// Window [start, end) of adaptive output index o along an axis of size n split into m.
fn adaptive_window(o: u32, n: u32, m: u32) -> vec2<u32> {
    return vec2<u32>((o * n) / m, ((o + 1u) * n + m - 1u) / m);
}

// Number of elements averaged by window (oy, ox) in the non-adaptive average modes.
fn avg_divisor(oy: u32, ox: u32) -> f32 {
    if (p.mode == 1u) {
        return f32(p.kh * p.kw);
    }
    var count = 0u;
    for (var ky = 0u; ky < p.kh; ky += 1u) {
        let iy = i32(oy * p.sh + ky * p.dh) - i32(p.ph);
        for (var kx = 0u; kx < p.kw; kx += 1u) {
            let ix = i32(ox * p.sw + kx * p.dw) - i32(p.pw);
            if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                count += 1u;
            }
        }
    }
    return f32(count);
}

@compute @workgroup_size(256)
fn pool2d_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    let total = p.planes * p.oh * p.ow;
    if (i >= total) { return; }
    let plane = div_index(i, p.oh * p.ow);
    let in_plane = i - plane * p.oh * p.ow;
    let oy = div_index(in_plane, p.ow);
    let ox = in_plane - oy * p.ow;
    let base = plane * p.h * p.w;
    if (p.mode == 3u) {
        let wy = adaptive_window(oy, p.h, p.oh);
        let wx = adaptive_window(ox, p.w, p.ow);
        var acc = 0.0;
        for (var iy = wy.x; iy < wy.y; iy += 1u) {
            for (var ix = wx.x; ix < wx.y; ix += 1u) {
                acc += f32(a[base + iy * p.w + ix]);
            }
        }
        out[i] = OUT(acc / f32((wy.y - wy.x) * (wx.y - wx.x)));
        return;
    }
    var best = -bitcast<f32>(0x7f800000u);
    var best_idx = 0u;
    var found = false;
    var acc = 0.0;
    for (var ky = 0u; ky < p.kh; ky += 1u) {
        let iy = i32(oy * p.sh + ky * p.dh) - i32(p.ph);
        if (iy < 0 || iy >= i32(p.h)) { continue; }
        for (var kx = 0u; kx < p.kw; kx += 1u) {
            let ix = i32(ox * p.sw + kx * p.dw) - i32(p.pw);
            if (ix < 0 || ix >= i32(p.w)) { continue; }
            let idx = u32(iy) * p.w + u32(ix);
            let v = f32(a[base + idx]);
            acc += v;
            // The first maximum in scan order wins; a NaN wins and stays.
            if (!found || (!is_nan(best) && (v > best || is_nan(v)))) {
                best = v;
                best_idx = idx;
                found = true;
            }
        }
    }
    if (p.mode == 0u) {
        out[i] = OUT(best);
        // Inference asks for no indices (idx_off = 0xffffffff).
        if (p.idx_off != 0xffffffffu) {
            out[p.idx_off + i] = OUT(f32(best_idx));
        }
    } else {
        out[i] = OUT(acc / avg_divisor(oy, ox));
    }
}

@compute @workgroup_size(256)
fn max_pool2d_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    let total = p.planes * p.h * p.w;
    if (i >= total) { return; }
    let plane = div_index(i, p.h * p.w);
    let idx = i - plane * (p.h * p.w);
    let iy = div_small(idx, p.w);
    let ix = idx - iy * p.w;
    let obase = plane * p.oh * p.ow;
    var acc = 0.0;
    // Windows that tile the input (stride = size, no padding or dilation): one window holds
    // each element.
    if (p.sh == p.kh && p.sw == p.kw && p.ph == 0u && p.pw == 0u && p.dh == 1u && p.dw == 1u) {
        let oy = div_small(iy, p.sh);
        let ox = div_small(ix, p.sw);
        if (oy < p.oh && ox < p.ow) {
            let o = obase + oy * p.ow + ox;
            if (f32(b[p.idx_off + o]) == f32(idx)) {
                acc = f32(a[o]);
            }
        }
        out[i] = OUT(acc);
        return;
    }
    for (var ky = 0u; ky < p.kh; ky += 1u) {
        let oy = div_exact(i32(iy + p.ph) - i32(ky * p.dh), p.sh);
        if (oy >= p.oh) { continue; }
        for (var kx = 0u; kx < p.kw; kx += 1u) {
            let ox = div_exact(i32(ix + p.pw) - i32(kx * p.dw), p.sw);
            if (ox >= p.ow) { continue; }
            let o = obase + oy * p.ow + ox;
            if (f32(b[p.idx_off + o]) == f32(idx)) {
                acc += f32(a[o]);
            }
        }
    }
    out[i] = OUT(acc);
}

@compute @workgroup_size(256)
fn avg_pool2d_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    let total = p.planes * p.h * p.w;
    if (i >= total) { return; }
    let plane = div_index(i, p.h * p.w);
    let idx = i - plane * (p.h * p.w);
    let iy = div_small(idx, p.w);
    let ix = idx - iy * p.w;
    let obase = plane * p.oh * p.ow;
    var acc = 0.0;
    if (p.mode == 3u) {
        for (var oy = 0u; oy < p.oh; oy += 1u) {
            let wy = adaptive_window(oy, p.h, p.oh);
            if (iy < wy.x || iy >= wy.y) { continue; }
            for (var ox = 0u; ox < p.ow; ox += 1u) {
                let wx = adaptive_window(ox, p.w, p.ow);
                if (ix < wx.x || ix >= wx.y) { continue; }
                acc += f32(a[obase + oy * p.ow + ox]) / f32((wy.y - wy.x) * (wx.y - wx.x));
            }
        }
        out[i] = OUT(acc);
        return;
    }
    for (var ky = 0u; ky < p.kh; ky += 1u) {
        let oy = div_exact(i32(iy + p.ph) - i32(ky * p.dh), p.sh);
        if (oy >= p.oh) { continue; }
        for (var kx = 0u; kx < p.kw; kx += 1u) {
            let ox = div_exact(i32(ix + p.pw) - i32(kx * p.dw), p.sw);
            if (ox >= p.ow) { continue; }
            acc += f32(a[obase + oy * p.ow + ox]) / avg_divisor(oy, ox);
        }
    }
    out[i] = OUT(acc);
}
