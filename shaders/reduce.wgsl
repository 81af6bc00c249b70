// Reduction family: sum, mean, max, min, argmax, argmin, variance and softmax along one axis.
//
// One workgroup per output row. A row is the p.red_len elements that start at the position of
// the kept coordinates (p.shape, strides p.sin) and step p.red_stride through the input. The
// launch code merges several reduced axes into one when they are adjacent in memory, and
// otherwise reduces one axis per dispatch.
//
// Bindings:
//   x   (0): input, strided
//   out (3): reductions: one value per row, at the kept coordinates through p.sout;
//            softmax: the full shape, row element r at p.sout-position + r * p.out_red_stride
//   p   (4): ReduceParams (src/ops/reduce.rs)

struct Params {
    n_out: u32,
    rank: u32,
    red_len: u32,
    op: u32,
    off_in: u32,
    red_stride: u32,
    out_red_stride: u32,
    correction: f32,
    shape: array<vec4<u32>, 2>,
    sin: array<vec4<u32>, 2>,
    sout: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

const WG: u32 = 64u;

var<workgroup> sv: array<f32, 64>;
var<workgroup> si: array<u32, 64>;

// (input start, output position) of row `row`.
fn row_bases(row: u32) -> vec2<u32> {
    var rem = row;
    var base = vec2<u32>(p.off_in, 0u);
    for (var d = i32(p.rank) - 1; d >= 0; d -= 1) {
        let k = u32(d);
        let size = p.shape[k >> 2u][k & 3u];
        let idx = rem % size;
        rem = rem / size;
        base += idx * vec2<u32>(p.sin[k >> 2u][k & 3u], p.sout[k >> 2u][k & 3u]);
    }
    return base;
}

fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

fn tree_sum(t: u32, v: f32) -> f32 {
    sv[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            sv[t] += sv[t + s];
        }
        workgroupBarrier();
    }
    let r = sv[0];
    workgroupBarrier();
    return r;
}

// True when (v, i) should replace (bv, bi): NaN wins, then the larger (or smaller, for min)
// value, then the lower index.
fn better(v: f32, i: u32, bv: f32, bi: u32, want_max: bool) -> bool {
    let vn = is_nan(v);
    let bn = is_nan(bv);
    if (vn || bn) {
        return (vn && !bn) || (vn && bn && i < bi);
    }
    if (v == bv) {
        return i < bi;
    }
    return select((v < bv), (v > bv), want_max);
}

// Workgroup arg-reduction; every invocation gets the winner.
fn tree_arg(t: u32, v: f32, i: u32, want_max: bool) -> vec2<u32> {
    sv[t] = v;
    si[t] = i;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s && better(sv[t + s], si[t + s], sv[t], si[t], want_max)) {
            sv[t] = sv[t + s];
            si[t] = si[t + s];
        }
        workgroupBarrier();
    }
    let r = vec2<u32>(bitcast<u32>(sv[0]), si[0]);
    workgroupBarrier();
    return r;
}

fn row_arg(t: u32, start: u32, want_max: bool) -> vec2<u32> {
    var bv = select(inf(), -inf(), want_max);
    var bi = 0xffffffffu;
    for (var r = t; r < p.red_len; r += WG) {
        let v = x[start + r * p.red_stride];
        if (better(v, r, bv, bi, want_max)) {
            bv = v;
            bi = r;
        }
    }
    return tree_arg(t, bv, bi, want_max);
}

fn row_sum(t: u32, start: u32) -> f32 {
    var acc = 0.0;
    for (var r = t; r < p.red_len; r += WG) {
        acc += x[start + r * p.red_stride];
    }
    return tree_sum(t, acc);
}

// Op codes: must match ReduceOp in src/ops/reduce.rs.
@compute @workgroup_size(64)
fn reduce_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = row_index(wid, nwg);
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    if (row >= p.n_out) { return; }
    let t = lid.x;
    let base = row_bases(row);
    let n = f32(p.red_len);
    var result = 0.0;
    switch p.op {
        case 0u: { result = row_sum(t, base.x); }
        case 1u: { result = row_sum(t, base.x) / n; }
        case 2u: { result = bitcast<f32>(row_arg(t, base.x, true).x); }
        case 3u: { result = bitcast<f32>(row_arg(t, base.x, false).x); }
        case 4u: { result = f32(row_arg(t, base.x, true).y); }
        case 5u: { result = f32(row_arg(t, base.x, false).y); }
        case 6u: {
            // Two passes (mean, then squared deviations) for accuracy.
            let mean = row_sum(t, base.x) / n;
            var acc = 0.0;
            for (var r = t; r < p.red_len; r += WG) {
                let d = x[base.x + r * p.red_stride] - mean;
                acc += d * d;
            }
            let ss = tree_sum(t, acc);
            let dof = n - p.correction;
            result = select(ss / dof, nan(), dof <= 0.0);
        }
        default: { result = nan(); }
    }
    if (t == 0u) {
        out[base.y] = result;
    }
}

// The same reductions with one invocation per row and no workgroup memory, every statistic
// gathered in one pass (the variance by Welford's update): for software adapters, where
// barriers are costly. 64 rows per workgroup.
@compute @workgroup_size(64)
fn reduce_serial_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = row_index(wid, nwg) * WG + lid.x;
    if (row >= p.n_out) { return; }
    let base = row_bases(row);
    var sum = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    var hi = -inf();
    var hi_i = 0xffffffffu;
    var lo = inf();
    var lo_i = 0xffffffffu;
    for (var r = 0u; r < p.red_len; r += 1u) {
        let v = x[base.x + r * p.red_stride];
        sum += v;
        let d = v - mean;
        mean += d / f32(r + 1u);
        m2 += d * (v - mean);
        if (better(v, r, hi, hi_i, true)) {
            hi = v;
            hi_i = r;
        }
        if (better(v, r, lo, lo_i, false)) {
            lo = v;
            lo_i = r;
        }
    }
    let n = f32(p.red_len);
    let dof = n - p.correction;
    var result = nan();
    switch p.op {
        case 0u: { result = sum; }
        case 1u: { result = sum / n; }
        case 2u: { result = hi; }
        case 3u: { result = lo; }
        case 4u: { result = f32(hi_i); }
        case 5u: { result = f32(lo_i); }
        case 6u: { result = select(m2 / dof, nan(), dof <= 0.0); }
        default: {}
    }
    out[base.y] = result;
}

fn row_max(t: u32, start: u32) -> f32 {
    return bitcast<f32>(row_arg(t, start, true).x);
}

fn row_sum_exp(t: u32, start: u32, m: f32) -> f32 {
    var acc = 0.0;
    for (var r = t; r < p.red_len; r += WG) {
        acc += exp(x[start + r * p.red_stride] - m);
    }
    return tree_sum(t, acc);
}

@compute @workgroup_size(64)
fn softmax_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = row_index(wid, nwg);
    if (row >= p.n_out) { return; }
    let t = lid.x;
    let base = row_bases(row);
    let m = row_max(t, base.x);
    let inv = 1.0 / row_sum_exp(t, base.x, m);
    for (var r = t; r < p.red_len; r += WG) {
        out[base.y + r * p.out_red_stride] = exp(x[base.x + r * p.red_stride] - m) * inv;
    }
}

@compute @workgroup_size(64)
fn log_softmax_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = row_index(wid, nwg);
    if (row >= p.n_out) { return; }
    let t = lid.x;
    let base = row_bases(row);
    let m = row_max(t, base.x);
    let lse = m + log(row_sum_exp(t, base.x, m));
    for (var r = t; r < p.red_len; r += WG) {
        out[base.y + r * p.out_red_stride] = x[base.x + r * p.red_stride] - lse;
    }
}
