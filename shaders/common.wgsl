// Shared by every kernel file: kiln prepends this file to each shader source
// (src/kernels.rs), so special values and the activations have one definition.

fn inf() -> f32 {
    return bitcast<f32>(0x7f800000u);
}

fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

fn is_nan(x: f32) -> bool {
    // Exponent all ones and a non-zero mantissa; immune to fast-math folding of x != x.
    let bits = bitcast<u32>(x);
    return (bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0u;
}

fn erf_approx(x: f32) -> f32 {
    // Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7.
    let s = sign(x);
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-z * z));
}

fn sigmoid(x: f32) -> f32 {
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}

fn power(x: f32, y: f32) -> f32 {
    if (y == 0.0) {
        return 1.0;
    }
    if (is_nan(x) || is_nan(y)) {
        return nan();
    }
    if (x == 0.0) {
        return select(inf(), 0.0, y > 0.0);
    }
    if (x > 0.0) {
        return exp2(y * log2(x));
    }
    // Negative base: defined only for integral exponents.
    if (y != floor(y)) {
        return nan();
    }
    let r = exp2(y * log2(-x));
    let odd = (y * 0.5) != floor(y * 0.5);
    return select(r, -r, odd);
}

fn safe_log(x: f32) -> f32 {
    if (x < 0.0) {
        return nan();
    }
    if (x == 0.0) {
        return -inf();
    }
    return log(x);
}

fn safe_sqrt(x: f32) -> f32 {
    return select(sqrt(x), nan(), x < 0.0);
}

// ln(1 + x) without the cancellation of log(1 + x) near 0. For |x| < 0.5 it is
// 2 atanh(z) = 2 (z + z^3/3 + z^5/5 + ...) with z = x / (2 + x), |z| <= 1/3: eight terms reach
// f32 precision. (Goldberg's log(u) x / (u - 1) is not used: compilers may fold u - 1 to x.)
// Elsewhere log(1 + x) is accurate: 1 + x is exact below -0.5, and log1p(x) >= 0.4 above 0.5.
fn log1p_accurate(x: f32) -> f32 {
    if (x < -1.0) { return nan(); }
    if (x == -1.0) { return -inf(); }
    if (abs(x) >= 0.5) { return log(1.0 + x); }
    let z = x / (2.0 + x);
    let z2 = z * z;
    var s = 1.0 / 17.0;
    s = 1.0 / 15.0 + z2 * s;
    s = 1.0 / 13.0 + z2 * s;
    s = 1.0 / 11.0 + z2 * s;
    s = 1.0 / 9.0 + z2 * s;
    s = 1.0 / 7.0 + z2 * s;
    s = 1.0 / 5.0 + z2 * s;
    s = 1.0 / 3.0 + z2 * s;
    s = 1.0 + z2 * s;
    return 2.0 * z * s;
}

const GELU_TANH_K: f32 = 0.7978845608028654; // sqrt(2 / pi)

fn gelu_tanh(x: f32) -> f32 {
    let t = tanh(clamp(GELU_TANH_K * (x + 0.044715 * x * x * x), -15.0, 15.0));
    return 0.5 * x * (1.0 + t);
}

// Unary op codes: must match UnaryOp in src/ops/elementwise.rs.
fn unary_op(op: u32, x: f32, alpha: f32, beta: f32) -> f32 {
    // NaN in, NaN out (as PyTorch), tested on the bits: drivers may assume there is no NaN and
    // fold max(NaN, 0) to 0 or tanh(NaN) to -1.
    if (is_nan(x)) { return x; }
    switch op {
        case 0u: { return x; }                                   // identity (copy)
        case 1u: { return -x; }                                  // neg
        case 2u: { return abs(x); }                              // abs
        case 3u: { return exp(x); }                              // exp
        case 4u: { return safe_log(x); }                         // log
        case 5u: { return safe_sqrt(x); }                        // sqrt
        case 6u: {                                               // rsqrt
            if (x == 0.0) { return inf(); }
            return 1.0 / safe_sqrt(x);
        }
        case 7u: { return max(x, 0.0); }                         // relu
        case 8u: { return select(x * alpha, x, x >= 0.0); }      // leaky_relu(alpha = slope)
        case 9u: { return sigmoid(x); }                          // sigmoid
        case 10u: { return tanh(clamp(x, -15.0, 15.0)); }        // tanh
        case 11u: { return 0.5 * x * (1.0 + erf_approx(x * 0.70710678118654752)); } // gelu (erf)
        case 12u: { return x * sigmoid(x); }                     // silu
        case 13u: { return min(max(x, alpha), beta); }           // clamp(alpha = min, beta = max)
        case 14u: { return log1p_accurate(x); }                  // log1p
        case 15u: {                                              // softplus(alpha = beta, beta = threshold)
            let z = alpha * x;
            if (z > beta) { return x; }
            return (max(z, 0.0) + log1p_accurate(exp(-abs(z)))) / alpha;
        }
        case 16u: { return sin(x); }                             // sin
        case 17u: { return cos(x); }                             // cos
        case 18u: { return gelu_tanh(x); }                       // gelu, tanh approximation
        case 19u: { return erf_approx(x); }                      // erf
        case 20u: { return trunc(x); }                           // trunc
        default: { return nan(); }
    }
}

// The optional epilogue of a producing kernel (matmul, conv2d): bit 0 adds a bias, bit 1
// applies the activation whose UnaryOp code is in bits 8..15 (with `alpha`, e.g. a slope).
// Bit 2 (matmul only) indexes the bias by output row instead of column: a convolution run as
// weight @ im2col matrix, whose rows are its output channels. Bits 16..18 (the vec4 matmul
// kernels only) are the folds of the header that build.rs writes.
const EPILOGUE_BIAS: u32 = 1u;
const EPILOGUE_ACTIVATION: u32 = 2u;
const EPILOGUE_BIAS_ROWS: u32 = 4u;

fn epilogue_activation(v: f32, flags: u32, alpha: f32) -> f32 {
    if ((flags & EPILOGUE_ACTIVATION) != 0u) {
        return unary_op((flags >> 8u) & 255u, v, alpha, 0.0);
    }
    return v;
}

// t / s when t >= 0 and s divides t, else a value no size reaches. Float division (exact here:
// positions stay far below 2^24) instead of an integer division by a non-constant, which CPU
// adapters run one lane at a time and GPUs emulate.
fn div_exact(t: i32, s: u32) -> u32 {
    let q = u32(round(f32(t) / f32(s)));
    return select(0xffffffffu, q, t >= 0 && q * s == u32(t));
}

// k / d for k + d below 2^23 (positions in a kernel or an image plane): float arithmetic, exact
// at these sizes, instead of an integer division by a non-constant (emulated on GPUs, one lane
// at a time on CPU adapters).
fn div_small(k: u32, d: u32) -> u32 {
    return u32((f32(k) + 0.5) / f32(d));
}

// k / d for k below 2^22, any d > 0: div_small corrected by one step, since a GPU's f32
// division may be 2.5 ULP off (WGSL's bound), which near 2^22 moves the quotient by one.
fn div_below_2_22(k: u32, d: u32) -> u32 {
    var q = div_small(k, d);
    let r = i32(k) - i32(q * d);
    if (r < 0) {
        q -= 1u;
    } else if (r >= i32(d)) {
        q += 1u;
    }
    return q;
}
