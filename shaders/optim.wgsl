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

fn gradient(i: u32) -> f32 {
    let g = grad[p.off_g + i];
    return select(g, -g, (p.flags & FLAG_MAXIMIZE) != 0u);
}

// SGD without momentum: p -= lr (g + wd p)
@compute @workgroup_size(256)
fn sgd_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let w = param[p.off_p + i];
    let g = gradient(i) + p.weight_decay * w;
    param[p.off_p + i] = w - p.lr * g;
}

// SGD with momentum: b = g on the first step, else momentum b + (1 - dampening) g;
// the step uses g + momentum b (Nesterov) or b.
@compute @workgroup_size(256)
fn sgd_momentum_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let w = param[p.off_p + i];
    let g = gradient(i) + p.weight_decay * w;
    var b: f32;
    if ((p.flags & FLAG_FIRST_STEP) != 0u) {
        b = g;
    } else {
        b = p.momentum * s1[i] + (1.0 - p.dampening) * g;
    }
    s1[i] = b;
    let d = select(b, g + p.momentum * b, (p.flags & FLAG_NESTEROV) != 0u);
    param[p.off_p + i] = w - p.lr * d;
}

// Adam / AdamW (decoupled weight decay): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps).
@compute @workgroup_size(256)
fn adam_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    var w = param[p.off_p + i];
    var g = gradient(i);
    if ((p.flags & FLAG_DECOUPLED) != 0u) {
        w = w * (1.0 - p.lr * p.weight_decay);
    } else {
        g = g + p.weight_decay * w;
    }
    let m = p.beta1 * s1[i] + (1.0 - p.beta1) * g;
    let v = p.beta2 * s2[i] + (1.0 - p.beta2) * g * g;
    s1[i] = m;
    s2[i] = v;
    let denom = sqrt(v) / p.bias_correction2_sqrt + p.eps;
    param[p.off_p + i] = w - (p.lr / p.bias_correction1) * (m / denom);
}
