// Elementwise family: unary and binary maths, where/select, fills, random numbers, gather.
//
// Every entry point computes logical element i (row-major over p.shape, i < p.n) and writes it
// to out at the strided position given by p.so and p.off_o. Each input is read through its own
// strides, so broadcast axes (stride 0), transposes and slices need no copy. A set bit in
// p.flags marks an operand as contiguous, which skips the index arithmetic for it.
//
// Bindings (unused ones are absent from an entry point's layout):
//   a   (0): first input,  read through p.sa / p.off_a
//   b   (1): second input, read through p.sb / p.off_b
//   c   (2): third input,  read through p.sc / p.off_c
//   out (3): output,       written through p.so / p.off_o
//   p   (4): ElementwiseParams (src/ops/elementwise.rs), one copy per dispatch

struct Params {
    n: u32,
    rank: u32,
    op: u32,
    flags: u32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    off_o: u32,
    alpha: f32,
    beta: f32,
    aux0: u32,
    aux1: u32,
    shape: array<vec4<u32>, 2>,
    sa: array<vec4<u32>, 2>,
    sb: array<vec4<u32>, 2>,
    sc: array<vec4<u32>, 2>,
    so: array<vec4<u32>, 2>,
}

// Element types of the input and output buffers: f32, or f16 in the variants that src/kernels.rs
// derives from this file (arithmetic stays in f32).
alias IN = f32;
alias OUT = f32;

@group(0) @binding(0) var<storage, read> a: array<IN>;
@group(0) @binding(1) var<storage, read> b: array<IN>;
@group(0) @binding(2) var<storage, read> c: array<IN>;
@group(0) @binding(3) var<storage, read_write> out: array<OUT>;
@group(0) @binding(4) var<uniform> p: Params;
// Fault words (src/device/mod.rs): a code and the offending value, read back by the host.
@group(0) @binding(5) var<storage, read_write> fault: array<atomic<u32>, 2>;

const FLAG_A_CONTIG: u32 = 1u;
const FLAG_B_CONTIG: u32 = 2u;
const FLAG_C_CONTIG: u32 = 4u;
const FLAG_O_CONTIG: u32 = 8u;
const FLAG_SCALAR_LEFT: u32 = 16u;
// In the strided4 kernels: the operand's innermost stride is 0 (one element, repeated).
const FLAG_A_SPLAT: u32 = 32u;
const FLAG_B_SPLAT: u32 = 64u;
// Every logical index is below 2^22: positions split with float division (div_below_2_22), which
// lavapipe runs for all lanes at once, instead of an integer division lane by lane.
const FLAG_SMALL_INDEX: u32 = 128u;

// rem / size in x and rem % size in y.
fn split_index(rem: u32, size: u32) -> vec2<u32> {
    var q: u32;
    if ((p.flags & FLAG_SMALL_INDEX) != 0u) {
        q = div_below_2_22(rem, size);
    } else {
        q = rem / size;
    }
    return vec2<u32>(q, rem - q * size);
}

const WG: u32 = 256u;
// Elements each invocation of unary_fwd and binary_fwd handles, WG * (grid size) apart, so
// that more loads are in flight per invocation (Kernel::per_invocation in src/kernels.rs).
const PER_INVOCATION: u32 = 4u;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// Buffer positions of logical element i in a, b, c and out through their strides (for the
// strided4 kernels, i a multiple of 4: of elements i..i+3).
fn strided_offsets(i: u32) -> vec4<u32> {
    var q = vec4<u32>(p.off_a, p.off_b, p.off_c, p.off_o);
    var rem = i;
    for (var d = i32(p.rank) - 1; d >= 0; d -= 1) {
        let k = u32(d);
        let size = p.shape[k >> 2u][k & 3u];
        let qr = split_index(rem, size);
        let idx = qr.y;
        rem = qr.x;
        q += idx * vec4<u32>(p.sa[k >> 2u][k & 3u], p.sb[k >> 2u][k & 3u], p.sc[k >> 2u][k & 3u], p.so[k >> 2u][k & 3u]);
    }
    return q;
}

// Buffer positions of logical element i in a, b, c and out.
fn offsets(i: u32) -> vec4<u32> {
    var o = vec4<u32>(p.off_a + i, p.off_b + i, p.off_c + i, p.off_o + i);
    if ((p.flags & 15u) == 15u) {
        return o;
    }
    let q = strided_offsets(i);
    let contig = vec4<bool>((p.flags & FLAG_A_CONTIG) != 0u, (p.flags & FLAG_B_CONTIG) != 0u,
        (p.flags & FLAG_C_CONTIG) != 0u, (p.flags & FLAG_O_CONTIG) != 0u);
    return select(q, o, contig);
}

// Binary op codes: must match BinaryOp in src/ops/elementwise.rs.
fn binary_op(op: u32, x: f32, y: f32) -> f32 {
    switch op {
        case 0u: { return x + y; }
        case 1u: { return x - y; }
        case 2u: { return x * y; }
        case 3u: { return x / y; }
        case 4u: { return power(x, y); }
        case 5u: {                                               // maximum, NaN-propagating
            if (is_nan(x) || is_nan(y)) { return nan(); }
            return max(x, y);
        }
        case 6u: {                                               // minimum, NaN-propagating
            if (is_nan(x) || is_nan(y)) { return nan(); }
            return min(x, y);
        }
        // Comparisons with NaN are false, except !=, whatever the driver assumes.
        case 7u: { return select(0.0, 1.0, x == y && !(is_nan(x) || is_nan(y))); }
        case 8u: { return select(0.0, 1.0, x != y || is_nan(x) || is_nan(y)); }
        case 9u: { return select(0.0, 1.0, x < y && !(is_nan(x) || is_nan(y))); }
        case 10u: { return select(0.0, 1.0, x <= y && !(is_nan(x) || is_nan(y))); }
        case 11u: { return select(0.0, 1.0, x > y && !(is_nan(x) || is_nan(y))); }
        case 12u: { return select(0.0, 1.0, x >= y && !(is_nan(x) || is_nan(y))); }
        default: { return nan(); }
    }
}

// Derivative of unary op `op` (UnaryOp codes), from the saved value v: the output y for exp,
// sqrt, rsqrt, sigmoid and tanh, the input x for the others (UnaryOp::grad_uses_output).
fn unary_grad(op: u32, v: f32, alpha: f32, beta: f32) -> f32 {
    switch op {
        case 0u: { return 1.0; }                                  // identity
        case 1u: { return -1.0; }                                 // neg
        case 2u: { return sign(v); }                              // abs: sign(x), 0 at 0
        case 3u: { return v; }                                    // exp: y
        case 4u: { return 1.0 / v; }                              // log: 1/x
        case 5u: { return 0.5 / v; }                              // sqrt: 1/(2y)
        case 6u: { return -0.5 * v * v * v; }                     // rsqrt: -y^3/2
        case 7u: { return select(0.0, 1.0, v > 0.0); }            // relu: [x > 0]
        case 8u: { return select(alpha, 1.0, v > 0.0); }          // leaky_relu
        case 9u: { return v * (1.0 - v); }                        // sigmoid: y(1 - y)
        case 10u: { return 1.0 - v * v; }                         // tanh: 1 - y^2
        case 11u: {                                               // gelu: Phi(x) + x phi(x)
            let cdf = 0.5 * (1.0 + erf_approx(v * 0.70710678118654752));
            let pdf = 0.3989422804014327 * exp(-0.5 * v * v);
            return cdf + v * pdf;
        }
        case 12u: {                                               // silu: s + x s (1 - s)
            let s = sigmoid(v);
            return s + v * s * (1.0 - s);
        }
        case 13u: { return select(0.0, 1.0, v >= alpha && v <= beta); } // clamp: [lo <= x <= hi]
        case 14u: { return 1.0 / (1.0 + v); }                     // log1p: 1/(1 + x)
        case 15u: {                                               // softplus: sigmoid(beta x)
            let z = alpha * v;
            return select(sigmoid(z), 1.0, z > beta);
        }
        case 16u: { return cos(v); }                              // sin: cos x
        case 17u: { return -sin(v); }                             // cos: -sin x
        case 18u: {                                               // gelu (tanh)
            let inner = GELU_TANH_K * (v + 0.044715 * v * v * v);
            let t = tanh(clamp(inner, -15.0, 15.0));
            let dinner = GELU_TANH_K * (1.0 + 3.0 * 0.044715 * v * v);
            return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * dinner;
        }
        case 19u: { return 1.1283791670955126 * exp(-v * v); }   // erf: 2/sqrt(pi) e^(-x^2)
        case 20u: { return 0.0; }                                 // trunc: 0
        default: { return nan(); }
    }
}

// ---- entry points ----

// out = unary(a)
@compute @workgroup_size(256)
fn unary_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n) { return; }
        let o = offsets(i);
        out[o.w] = OUT(unary_op(p.op, f32(a[o.x]), p.alpha, p.beta));
    }
}

// ---- vec4 variants ----
//
// unary_fwd, binary_fwd, binary_scalar_fwd and unary_bwd for operands that are all contiguous
// with the same shape, n and every offset a multiple of 4 (src/ops/elementwise.rs checks):
// each step reads and writes vec4s, a quarter of the memory instructions. Each invocation
// handles PER_INVOCATION vec4s, WG * (grid size) apart.

@group(0) @binding(0) var<storage, read> a4: array<vec4<IN>>;
@group(0) @binding(1) var<storage, read> b4: array<vec4<IN>>;
@group(0) @binding(3) var<storage, read_write> out4: array<vec4<OUT>>;

// p.op on each of four elements (the vec4 kernels).
fn unary4(x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(unary_op(p.op, x.x, p.alpha, p.beta), unary_op(p.op, x.y, p.alpha, p.beta),
        unary_op(p.op, x.z, p.alpha, p.beta), unary_op(p.op, x.w, p.alpha, p.beta));
}

fn binary4(x: vec4<f32>, y: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(binary_op(p.op, x.x, y.x), binary_op(p.op, x.y, y.y),
        binary_op(p.op, x.z, y.z), binary_op(p.op, x.w, y.w));
}

@compute @workgroup_size(256)
fn unary_vec4_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n / 4u) { return; }
        let x = vec4<f32>(a4[p.off_a / 4u + i]);
        out4[p.off_o / 4u + i] = vec4<OUT>(unary4(x));
    }
}

@compute @workgroup_size(256)
fn binary_vec4_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n / 4u) { return; }
        let x = vec4<f32>(a4[p.off_a / 4u + i]);
        let y = vec4<f32>(b4[p.off_b / 4u + i]);
        out4[p.off_o / 4u + i] = vec4<OUT>(binary4(x, y));
    }
}

// unary_fwd and binary_fwd over strided operands, four output elements at a time: a
// transposing copy, a broadcast bias. The output's innermost axis is contiguous, its length a
// multiple of 4, its other strides and offset multiples of 4; each operand's innermost stride
// is 1 (read as vec4s, with 4-aligned other strides and offset) or 0 (FLAG_*_SPLAT: one element
// repeated). src/ops/elementwise.rs checks, after merging the axes that can be merged. The
// positions are computed once per four elements, with a quarter of the divisions.

fn strided4_a(q: u32) -> vec4<f32> {
    let v = vec4<f32>(a4[q / 4u]);
    if ((p.flags & FLAG_A_SPLAT) != 0u) {
        return vec4<f32>(v[q & 3u]);
    }
    return v;
}

fn strided4_b(q: u32) -> vec4<f32> {
    let v = vec4<f32>(b4[q / 4u]);
    if ((p.flags & FLAG_B_SPLAT) != 0u) {
        return vec4<f32>(v[q & 3u]);
    }
    return v;
}

@compute @workgroup_size(256)
fn unary_strided4_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n / 4u) { return; }
        let q = strided_offsets(4u * i);
        let x = strided4_a(q.x);
        out4[q.w / 4u] = vec4<OUT>(unary4(x));
    }
}

@compute @workgroup_size(256)
fn binary_strided4_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n / 4u) { return; }
        let q = strided_offsets(4u * i);
        let x = strided4_a(q.x);
        let y = strided4_b(q.y);
        out4[q.w / 4u] = vec4<OUT>(binary4(x, y));
    }
}

// binary_scalar_fwd, four elements at a time.
@compute @workgroup_size(256)
fn binary_scalar_vec4_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    let left = (p.flags & FLAG_SCALAR_LEFT) != 0u;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n / 4u) { return; }
        let v = vec4<f32>(a4[p.off_a / 4u + i]);
        let x = select(v, vec4<f32>(p.alpha), left);
        let y = select(vec4<f32>(p.alpha), v, left);
        out4[p.off_o / 4u + i] = vec4<OUT>(binary4(x, y));
    }
}

// unary_bwd, four elements at a time.
@compute @workgroup_size(256)
fn unary_vec4_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n / 4u) { return; }
        let x = vec4<f32>(a4[p.off_a / 4u + i]);
        let g = vec4<f32>(b4[p.off_b / 4u + i]);
        out4[p.off_o / 4u + i] = vec4<OUT>(g * vec4<f32>(unary_grad(p.op, x.x, p.alpha, p.beta),
            unary_grad(p.op, x.y, p.alpha, p.beta), unary_grad(p.op, x.z, p.alpha, p.beta),
            unary_grad(p.op, x.w, p.alpha, p.beta)));
    }
}

// out = unary(out) in place, four elements at a time: the activation after a matmul kernel
// that has no fused one.
@compute @workgroup_size(256)
fn unary_inplace_vec4_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n / 4u) { return; }
        let x = vec4<f32>(out4[p.off_o / 4u + i]);
        out4[p.off_o / 4u + i] = vec4<OUT>(unary4(x));
    }
}

// out = b * f'(a): the gradient of a unary op; a is the saved x or y, b the output gradient
@compute @workgroup_size(256)
fn unary_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let o = offsets(i);
    out[o.w] = OUT(f32(b[o.y]) * unary_grad(p.op, f32(a[o.x]), p.alpha, p.beta));
}

// out = binary(a, b) with broadcasting through strides
@compute @workgroup_size(256)
fn binary_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = linear_index(wid, nwg, lid);
    let stride = nwg.x * nwg.y * WG;
    for (var j = 0u; j < PER_INVOCATION; j += 1u) {
        let i = t + j * stride;
        if (i >= p.n) { return; }
        let o = offsets(i);
        out[o.w] = OUT(binary_op(p.op, f32(a[o.x]), f32(b[o.y])));
    }
}

// out = binary(a, alpha), or binary(alpha, a) with FLAG_SCALAR_LEFT
@compute @workgroup_size(256)
fn binary_scalar_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let o = offsets(i);
    let x = f32(a[o.x]);
    if ((p.flags & FLAG_SCALAR_LEFT) != 0u) {
        out[o.w] = OUT(binary_op(p.op, p.alpha, x));
    } else {
        out[o.w] = OUT(binary_op(p.op, x, p.alpha));
    }
}

// out = a != 0 ? b : c
@compute @workgroup_size(256)
fn where_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let o = offsets(i);
    out[o.w] = OUT(select(f32(c[o.z]), f32(b[o.y]), f32(a[o.x]) != 0.0));
}

// out = alpha
@compute @workgroup_size(256)
fn fill_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    out[offsets(i).w] = OUT(p.alpha);
}

// out = alpha + i * beta, computed in f32 as start + index * step
@compute @workgroup_size(256)
fn arange_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    out[offsets(i).w] = OUT(p.alpha + f32(i) * p.beta);
}

fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Counter-based: element i of a tensor seeded with (aux0, aux1) is the same on every device.
fn random_bits(i: u32, stream: u32) -> u32 {
    return pcg(pcg(i * 2u + stream) ^ pcg(p.aux0 ^ 0x9e3779b9u) ^ pcg(p.aux1 + 0x632be5abu));
}

fn unit_open_closed(bits: u32) -> f32 {
    // (0, 1]: never 0, so log() is finite.
    return (f32(bits >> 8u) + 1.0) * (1.0 / 16777216.0);
}

// out = uniform in [alpha, beta)
@compute @workgroup_size(256)
fn rand_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let u = f32(random_bits(i, 0u) >> 8u) * (1.0 / 16777216.0);
    out[offsets(i).w] = OUT(p.alpha + (p.beta - p.alpha) * u);
}

// out = beta where a uniform draw is >= alpha, else 0: a dropout mask with drop probability
// alpha and scale beta = 1 / (1 - alpha)
@compute @workgroup_size(256)
fn dropout_mask_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let u = f32(random_bits(i, 0u) >> 8u) * (1.0 / 16777216.0);
    out[offsets(i).w] = OUT(select(0.0, p.beta, u >= p.alpha));
}

// out = normal with mean alpha and standard deviation beta (Box-Muller)
@compute @workgroup_size(256)
fn randn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let u1 = unit_open_closed(random_bits(i, 0u));
    let u2 = f32(random_bits(i, 1u) >> 8u) * (1.0 / 16777216.0);
    let z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    out[offsets(i).w] = OUT(p.alpha + p.beta * z);
}

// out = f32(a[..., f32(b[...]), ...]): the index along the gathered axis comes from b (f32 holding an
// integer); the other axes come from the position. p.sa has 0 on the gathered axis, whose
// size and stride in a are aux0 and aux1. Out-of-range indices give 0.
@compute @workgroup_size(256)
fn gather_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let o = offsets(i);
    let fi = f32(b[o.y]);
    if (is_nan(fi) || !(fi >= 0.0) || fi >= f32(p.aux0) || fi != floor(fi)) {
        // No exception on a GPU: the host sees the fault at the next readback.
        if (atomicExchange(&fault[0], 1u) == 0u) {
            atomicStore(&fault[1], bitcast<u32>(fi));
        }
        out[o.w] = OUT(0.0);
        return;
    }
    out[o.w] = OUT(f32(a[o.x + u32(fi) * p.aux1]));
}

// Backward of gather_fwd (a scatter-add without atomics): out has the shape of the index with
// its gathered axis (p.op) widened to the input's size. Element c of out sums the output
// gradient a over the p.aux0 positions k along the axis whose index b equals f32(c[axis]). p.sa
// and p.sb have 0 on that axis; the gradient's and the index's strides along it are p.aux1
// and p.off_c.
@compute @workgroup_size(256)
fn gather_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let o = offsets(i);
    let axis = p.op;
    let target_index = f32((i / p.so[axis >> 2u][axis & 3u]) % p.shape[axis >> 2u][axis & 3u]);
    var acc = 0.0;
    for (var k = 0u; k < p.aux0; k += 1u) {
        if (f32(b[o.y + k * p.off_c]) == target_index) {
            acc += f32(a[o.x + k * p.aux1]);
        }
    }
    out[o.w] = OUT(acc);
}
