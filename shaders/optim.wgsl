// Optimizer family: one fused, in-place update per parameter tensor, with PyTorch's formulas.
//
// Bindings:
//   grad  (0): the parameter's gradient, p.n elements from p.off_g
//   param (3): the parameter, updated in place, p.n elements from p.off_p
//   s1    (5): momentum buffer (SGD) or first moment (Adam), from 0
//   s2    (6): second moment (Adam), from 0
//   p     (4): OptimParams (src/optim/mod.rs)

struct Params {
    n: u32,
    flags: u32,
    off_p: u32,
    off_g: u32,
    lr: f32,
    momentum: f32,
    dampening: f32,
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    bias_correction1: f32,
    bias_correction2_sqrt: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(5) var<storage, read_write> s1: array<f32>;
@group(0) @binding(6) var<storage, read_write> s2: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

const FLAG_NESTEROV: u32 = 1u;
const FLAG_FIRST_STEP: u32 = 2u;
const FLAG_DECOUPLED: u32 = 4u;
const FLAG_MAXIMIZE: u32 = 8u;

const WG: u32 = 256u;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid.x;
}

// The update formulas, four elements at a time; the scalar entry points use lane x.
fn signed(g: vec4<f32>) -> vec4<f32> {
    return select(g, -g, (p.flags & FLAG_MAXIMIZE) != 0u);
}

// SGD without momentum: p -= lr (g + wd p)
fn sgd(w: vec4<f32>, g: vec4<f32>) -> vec4<f32> {
    return w - p.lr * (signed(g) + p.weight_decay * w);
}

// SGD with momentum: b = g on the first step, else momentum b + (1 - dampening) g;
// the step uses g + momentum b (Nesterov) or b. Returns (new parameter, new b).
fn sgd_momentum(w: vec4<f32>, g0: vec4<f32>, b0: vec4<f32>) -> array<vec4<f32>, 2> {
    let g = signed(g0) + p.weight_decay * w;
    var b = g;
    if ((p.flags & FLAG_FIRST_STEP) == 0u) {
        b = p.momentum * b0 + (1.0 - p.dampening) * g;
    }
    let d = select(b, g + p.momentum * b, (p.flags & FLAG_NESTEROV) != 0u);
    return array<vec4<f32>, 2>(w - p.lr * d, b);
}

// Adam / AdamW (decoupled weight decay): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps). Returns (new parameter, m, v).
fn adam(w0: vec4<f32>, g0: vec4<f32>, m0: vec4<f32>, v0: vec4<f32>) -> array<vec4<f32>, 3> {
    var w = w0;
    var g = signed(g0);
    if ((p.flags & FLAG_DECOUPLED) != 0u) {
        w = w * (1.0 - p.lr * p.weight_decay);
    } else {
        g = g + p.weight_decay * w;
    }
    let m = p.beta1 * m0 + (1.0 - p.beta1) * g;
    let v = p.beta2 * v0 + (1.0 - p.beta2) * g * g;
    let denom = sqrt(v) / p.bias_correction2_sqrt + p.eps;
    return array<vec4<f32>, 3>(w - (p.lr / p.bias_correction1) * (m / denom), m, v);
}

// ---- one element per invocation ----

@compute @workgroup_size(256)
fn sgd_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    param[p.off_p + i] = sgd(vec4<f32>(param[p.off_p + i]), vec4<f32>(grad[p.off_g + i])).x;
}

@compute @workgroup_size(256)
fn sgd_momentum_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let r = sgd_momentum(vec4<f32>(param[p.off_p + i]), vec4<f32>(grad[p.off_g + i]), vec4<f32>(s1[i]));
    param[p.off_p + i] = r[0].x;
    s1[i] = r[1].x;
}

@compute @workgroup_size(256)
fn adam_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let r = adam(vec4<f32>(param[p.off_p + i]), vec4<f32>(grad[p.off_g + i]), vec4<f32>(s1[i]),
        vec4<f32>(s2[i]));
    param[p.off_p + i] = r[0].x;
    s1[i] = r[1].x;
    s2[i] = r[2].x;
}

// ---- four elements per invocation ----
//
// For n, p.off_p and p.off_g multiples of 4 (src/optim/mod.rs checks): vec4 reads and writes,
// a quarter of the memory instructions.

@group(0) @binding(0) var<storage, read> grad4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> param4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> s14: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> s24: array<vec4<f32>>;

@compute @workgroup_size(256)
fn sgd_vec4_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n / 4u) { return; }
    let ip = p.off_p / 4u + i;
    param4[ip] = sgd(param4[ip], grad4[p.off_g / 4u + i]);
}

@compute @workgroup_size(256)
fn sgd_momentum_vec4_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n / 4u) { return; }
    let ip = p.off_p / 4u + i;
    let r = sgd_momentum(param4[ip], grad4[p.off_g / 4u + i], s14[i]);
    param4[ip] = r[0];
    s14[i] = r[1];
}

@compute @workgroup_size(256)
fn adam_vec4_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n / 4u) { return; }
    let ip = p.off_p / 4u + i;
    let r = adam(param4[ip], grad4[p.off_g / 4u + i], s14[i], s24[i]);
    param4[ip] = r[0];
    s14[i] = r[1];
    s24[i] = r[2];
}
