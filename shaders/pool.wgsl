// Pooling family over (n * c) planes of h x w, contiguous: max, average and adaptive average,
// forward and backward. Backward kernels run one invocation per input element and sum over
// the windows that contain it, so no atomics are needed and results are deterministic.
//
// Bindings:
//   pool2d_fwd:       a (0) = x (planes, h, w); out (3) = y (planes, oh, ow), and for max
//                     pooling the chosen index (iy * w + ix, as f32) p.idx_off elements later
//   max_pool2d_bwd:   a (0) = dy, b (1) = the forward output buffer (values from 0, read
//                     with p.relu_mask; indices at p.idx_off); out (3) = dx
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
    // Max pooling backward: 1 when the input is a relu's output whose gradient mask this pass
    // applies (the window's gradient goes through only where its maximum is above 0).
    relu_mask: u32,
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

// Output element i's plane and position: (plane, oy, ox).
fn out_position(i: u32) -> vec3<u32> {
    let plane = div_index(i, p.oh * p.ow);
    let in_plane = i - plane * p.oh * p.ow;
    let oy = div_index(in_plane, p.ow);
    return vec3<u32>(plane, oy, in_plane - oy * p.ow);
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
    let at_out = out_position(i);
    let plane = at_out.x;
    let oy = at_out.y;
    let ox = at_out.z;
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

// The gradient that window o hands its chosen element: dy, times relu's derivative at the
// window's maximum (the forward output, at the start of binding b) with p.relu_mask.
fn chosen_grad(o: u32) -> f32 {
    let d = f32(a[o]);
    if (p.relu_mask != 0u) {
        return d * select(0.0, 1.0, f32(b[o]) > 0.0);
    }
    return d;
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
                acc = chosen_grad(o);
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
                acc += chosen_grad(o);
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

// Max pooling over 2x2 windows at stride 2, with no padding or dilation, of planes of even
// width: the pooling of most CNNs. Rows are read and written as pairs (half the storage
// accesses, each a loop over the SIMD lanes on software adapters), with no window loops.
//   max_pool2x2_fwd: a2 (0) = x; out (3) = y, and the chosen indices as pool2d_fwd writes them
//   max_pool2x2_bwd: a (0) = dy, b (1) = the forward output buffer (indices at p.idx_off);
//                    out2 (3) = dx, one invocation per 2x2 block of it (blocks past the
//                    last window, on odd heights, are zero)
@group(0) @binding(0) var<storage, read> a2: array<vec2<IN>>;
@group(0) @binding(3) var<storage, read_write> out2: array<vec2<OUT>>;

struct Best {
    v: f32,
    i: u32,
}

// The window's maximum so far after element (v, i) in scan order: the first maximum wins, a NaN
// wins and stays (as pool2d_fwd).
fn max_step(b: Best, v: f32, i: u32) -> Best {
    if (!is_nan(b.v) && (v > b.v || is_nan(v))) {
        return Best(v, i);
    }
    return b;
}

@compute @workgroup_size(256)
fn max_pool2x2_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    let total = p.planes * p.oh * p.ow;
    if (i >= total) { return; }
    let at_out = out_position(i);
    let plane = at_out.x;
    let oy = at_out.y;
    let ox = at_out.z;
    // The window's top-left element in its plane, and in the buffer (even: w is).
    let top = 2u * (oy * p.w + ox);
    let at = plane * p.h * p.w + top;
    let x0 = vec2<f32>(a2[at / 2u]);
    let x1 = vec2<f32>(a2[(at + p.w) / 2u]);
    var b = Best(x0.x, top);
    b = max_step(b, x0.y, top + 1u);
    b = max_step(b, x1.x, top + p.w);
    b = max_step(b, x1.y, top + p.w + 1u);
    out[i] = OUT(b.v);
    if (p.idx_off != 0xffffffffu) {
        out[p.idx_off + i] = OUT(f32(b.i));
    }
}

@compute @workgroup_size(256)
fn max_pool2x2_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    let bh = (p.h + 1u) / 2u;
    let bw = p.w / 2u;
    let total = p.planes * bh * bw;
    if (i >= total) { return; }
    let plane = div_index(i, bh * bw);
    let in_plane = i - plane * bh * bw;
    let by = div_index(in_plane, bw);
    let bx = in_plane - by * bw;
    let top = 2u * (by * p.w + bx);
    var g0 = vec2<f32>(0.0);
    var g1 = vec2<f32>(0.0);
    if (by < p.oh && bx < p.ow) {
        let o = plane * p.oh * p.ow + by * p.ow + bx;
        let chosen = u32(f32(b[p.idx_off + o]));
        let d = chosen_grad(o);
        g0 = select(vec2<f32>(0.0), vec2<f32>(d), vec2<u32>(top, top + 1u) == vec2<u32>(chosen));
        g1 = select(vec2<f32>(0.0), vec2<f32>(d),
                    vec2<u32>(top + p.w, top + p.w + 1u) == vec2<u32>(chosen));
    }
    let at = plane * p.h * p.w + top;
    out2[at / 2u] = vec2<OUT>(g0);
    if (2u * by + 1u < p.h) {
        out2[(at + p.w) / 2u] = vec2<OUT>(g1);
    }
}
