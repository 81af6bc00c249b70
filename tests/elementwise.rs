//! Elementwise kernels against an f64 CPU reference, on random inputs of odd shapes, empty and
//! size-1 axes, and non-contiguous views.

mod common;

use common::*;
use kiln::{Result, Tensor};

type GpuFn = fn(&Tensor) -> Result<Tensor>;

/// Views of one random input: contiguous of odd size, transposed, narrowed, broadcast,
/// rank 0 and empty. Each comes with its f64 reference.
fn views(rng: &mut Rng, lo: f32, hi: f32) -> Vec<(String, Tensor, Nd)> {
    let mut out = Vec::new();
    let (t, r) = rand_pair(rng, &[1031], lo, hi);
    out.push(("contiguous [1031]".to_string(), t, r));
    // Whole vec4s from offset 0: the vec4 kernels.
    let (t, r) = rand_pair(rng, &[4, 258], lo, hi);
    out.push(("aligned [4, 258]".to_string(), t, r));
    let (t, r) = rand_pair(rng, &[7, 13], lo, hi);
    out.push((
        "transposed [13, 7]".into(),
        t.t().unwrap(),
        r.permute(&[1, 0]),
    ));
    let (t, r) = rand_pair(rng, &[5, 9, 3], lo, hi);
    let narrowed = t.narrow(1, 2, 5).unwrap();
    let rn = Nd::new(
        &[5, 5, 3],
        (0..75)
            .map(|i| {
                let idx = unravel(i, &[5, 5, 3]);
                r.at(&[idx[0], idx[1] + 2, idx[2]])
            })
            .collect(),
    );
    out.push(("narrowed [5, 5, 3]".into(), narrowed, rn));
    let (t, r) = rand_pair(rng, &[3, 1], lo, hi);
    let expanded = t.expand(&[2, 3, 4]).unwrap();
    let re = r.zip(&Nd::new(&[2, 3, 4], vec![0.0; 24]), |a, _| a);
    out.push(("broadcast [2, 3, 4]".into(), expanded, re));
    let (t, r) = rand_pair(rng, &[], lo, hi);
    out.push(("rank 0".into(), t, r));
    let (t, r) = rand_pair(rng, &[3, 0, 5], lo, hi);
    out.push(("empty [3, 0, 5]".into(), t, r));
    out
}

fn check_unary(
    name: &str,
    f: GpuFn,
    reference: fn(f64) -> f64,
    lo: f32,
    hi: f32,
    atol: f64,
    rtol: f64,
) {
    let mut rng = Rng::new(name.len() as u64 * 7919);
    for (view, t, r) in views(&mut rng, lo, hi) {
        let got = f(&t).unwrap();
        assert_close(
            &format!("{name} on {view}"),
            &got,
            &r.map(reference),
            atol,
            rtol,
        );
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

// Tolerances: ops that are exact in IEEE f32 (neg, abs, relu, comparisons, +, -, *, /) are held
// to f32 rounding (rtol 1e-6). Transcendentals (exp, log, sqrt, tanh, ...) may be a few ulp off
// on GPUs: rtol 1e-5 plus atol 1e-6 near zero. GELU's erf approximation has absolute error
// below 1.5e-7, scaled by |x|/2 <= 2.5: atol 1e-6.

#[test]
fn unary_exact_ops() {
    check_unary("neg", Tensor::neg, |x| -x, -5.0, 5.0, 0.0, 1e-6);
    check_unary("abs", Tensor::abs, f64::abs, -5.0, 5.0, 0.0, 1e-6);
    check_unary("relu", Tensor::relu, |x| x.max(0.0), -5.0, 5.0, 0.0, 1e-6);
    check_unary(
        "leaky_relu",
        |t| t.leaky_relu(0.01),
        |x| if x >= 0.0 { x } else { 0.01 * x },
        -5.0,
        5.0,
        0.0,
        1e-6,
    );
    check_unary(
        "clamp",
        |t| t.clamp(-1.5, 2.0),
        |x| x.clamp(-1.5, 2.0),
        -5.0,
        5.0,
        0.0,
        1e-6,
    );
    check_unary("square", Tensor::square, |x| x * x, -5.0, 5.0, 0.0, 1e-6);
}

#[test]
fn unary_transcendental_ops() {
    check_unary("exp", Tensor::exp, f64::exp, -10.0, 10.0, 1e-6, 1e-5);
    check_unary("log", Tensor::log, f64::ln, 0.01, 100.0, 1e-6, 1e-5);
    check_unary("sqrt", Tensor::sqrt, f64::sqrt, 0.0, 100.0, 1e-6, 1e-5);
    check_unary(
        "rsqrt",
        Tensor::rsqrt,
        |x| 1.0 / x.sqrt(),
        0.01,
        100.0,
        1e-6,
        1e-5,
    );
    check_unary("sigmoid", Tensor::sigmoid, sigmoid, -20.0, 20.0, 1e-6, 1e-5);
    check_unary("tanh", Tensor::tanh, f64::tanh, -20.0, 20.0, 1e-6, 1e-5);
    check_unary(
        "silu",
        Tensor::silu,
        |x| x * sigmoid(x),
        -20.0,
        20.0,
        1e-6,
        1e-5,
    );
    check_unary(
        "gelu",
        Tensor::gelu,
        |x| 0.5 * x * (1.0 + erf(x / 2f64.sqrt())),
        -5.0,
        5.0,
        1e-6,
        1e-5,
    );
    check_unary(
        "powf 2.5",
        |t| t.powf(2.5),
        |x| x.powf(2.5),
        0.0,
        4.0,
        1e-6,
        1e-5,
    );
    check_unary(
        "powf -1.5",
        |t| t.powf(-1.5),
        |x| x.powf(-1.5),
        0.1,
        4.0,
        1e-6,
        1e-5,
    );
}

#[test]
fn unary_special_values() {
    let d = dev();
    let t = Tensor::from_slice(&[-1.0, 0.0, f32::NAN, 1e30, -1e30], &[5], &d).unwrap();
    let log = t.log().unwrap().to_vec().unwrap();
    assert!(log[0].is_nan() && log[1] == f32::NEG_INFINITY && log[2].is_nan() && log[3] > 69.0);
    let sq = t.sqrt().unwrap().to_vec().unwrap();
    assert!(sq[0].is_nan() && sq[1] == 0.0);
    let s = t.sigmoid().unwrap().to_vec().unwrap();
    assert_eq!((s[3], s[4]), (1.0, 0.0));
    let th = t.tanh().unwrap().to_vec().unwrap();
    assert_eq!((th[3], th[4]), (1.0, -1.0));
    assert!(t.clamp(-1.0, 1.0).unwrap().to_vec().unwrap()[2].is_nan());
    assert_eq!(t.rsqrt().unwrap().to_vec().unwrap()[1], f32::INFINITY);
    // pow of a negative base: integral exponents only.
    let neg = Tensor::from_slice(&[-2.0, -2.0, -2.0, 0.0], &[4], &d).unwrap();
    let e = Tensor::from_slice(&[3.0, 2.0, 0.5, -1.0], &[4], &d).unwrap();
    let p = neg.pow(&e).unwrap().to_vec().unwrap();
    assert_eq!(&p[..2], &[-8.0, 4.0]);
    assert!(p[2].is_nan());
    assert_eq!(p[3], f32::INFINITY);
}

type BinFn = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// Broadcasting cases: equal shapes, trailing broadcast, both sides broadcast, rank 0,
/// size-1 axes, empty axes, and non-contiguous operands.
fn check_binary(
    name: &str,
    f: BinFn,
    reference: fn(f64, f64) -> f64,
    lo: f32,
    hi: f32,
    atol: f64,
    rtol: f64,
) {
    let mut rng = Rng::new(name.len() as u64 * 104729 + 1);
    let shapes: &[(&[usize], &[usize])] = &[
        (&[257], &[257]),
        (&[4, 258], &[4, 258]),
        (&[5, 7], &[7]),
        (&[4, 1, 3], &[1, 5, 1]),
        (&[], &[3, 2]),
        (&[2, 3], &[]),
        (&[1, 1], &[1]),
        (&[0, 3], &[1, 3]),
        (&[6, 1, 5], &[6, 0, 5]),
        (&[2, 3, 4, 5, 3], &[3, 1, 5, 1]),
    ];
    for &(sa, sb) in shapes {
        let (a, ra) = rand_pair(&mut rng, sa, lo, hi);
        let (b, rb) = rand_pair(&mut rng, sb, lo, hi);
        let got = f(&a, &b).unwrap();
        assert_close(
            &format!("{name} {sa:?} x {sb:?}"),
            &got,
            &ra.zip(&rb, reference),
            atol,
            rtol,
        );
    }
    // Non-contiguous operands: a transposed matrix with a broadcast row, and a narrowed slice.
    let (a, ra) = rand_pair(&mut rng, &[9, 6], lo, hi);
    let (b, rb) = rand_pair(&mut rng, &[9], lo, hi);
    let got = f(&a.t().unwrap(), &b).unwrap();
    assert_close(
        &format!("{name} transposed"),
        &got,
        &ra.permute(&[1, 0]).zip(&rb, reference),
        atol,
        rtol,
    );
    let got = f(&a.narrow(0, 3, 4).unwrap(), &a.narrow(0, 0, 4).unwrap()).unwrap();
    let top = Nd::new(&[4, 6], ra.data[18..42].to_vec());
    let bottom = Nd::new(&[4, 6], ra.data[..24].to_vec());
    assert_close(
        &format!("{name} narrowed"),
        &got,
        &top.zip(&bottom, reference),
        atol,
        rtol,
    );
}

fn b2f(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

#[test]
fn binary_ops_broadcast() {
    check_binary("add", Tensor::add, |a, b| a + b, -10.0, 10.0, 0.0, 1e-6);
    check_binary("sub", Tensor::sub, |a, b| a - b, -10.0, 10.0, 1e-6, 1e-6);
    check_binary("mul", Tensor::mul, |a, b| a * b, -10.0, 10.0, 0.0, 1e-6);
    check_binary("div", Tensor::div, |a, b| a / b, 0.5, 10.0, 0.0, 1e-6);
    check_binary("pow", Tensor::pow, f64::powf, 0.1, 3.0, 1e-6, 1e-5);
    check_binary("maximum", Tensor::maximum, f64::max, -10.0, 10.0, 0.0, 0.0);
    check_binary("minimum", Tensor::minimum, f64::min, -10.0, 10.0, 0.0, 0.0);
}

#[test]
fn comparisons_give_zero_one() {
    // Few distinct values so that equality actually happens.
    fn q(t: &Tensor) -> Tensor {
        t.mul_scalar(2.0)
            .unwrap()
            .clamp(-2.0, 2.0)
            .unwrap()
            .relu()
            .unwrap()
    }
    type Case = (&'static str, BinFn, fn(f64, f64) -> f64);
    let cmp: &[Case] = &[
        ("eq", Tensor::eq, |a, b| b2f(a == b)),
        ("ne", Tensor::ne, |a, b| b2f(a != b)),
        ("lt", Tensor::lt, |a, b| b2f(a < b)),
        ("le", Tensor::le, |a, b| b2f(a <= b)),
        ("gt", Tensor::gt, |a, b| b2f(a > b)),
        ("ge", Tensor::ge, |a, b| b2f(a >= b)),
    ];
    let mut rng = Rng::new(5);
    let (a, _) = rand_pair(&mut rng, &[6, 11], -1.0, 1.0);
    let (b, _) = rand_pair(&mut rng, &[11], -1.0, 1.0);
    let (a, b) = (q(&a), q(&b));
    let ra = Nd::from_f32(&[6, 11], &a.to_vec().unwrap());
    let rb = Nd::from_f32(&[11], &b.to_vec().unwrap());
    assert!(
        ra.data.iter().filter(|&&v| v == 0.0).count() > 10,
        "inputs should contain ties"
    );
    // And aligned operands of one shape: the vec4 kernels.
    let (c, _) = rand_pair(&mut rng, &[8, 12], -1.0, 1.0);
    let (e, _) = rand_pair(&mut rng, &[8, 12], -1.0, 1.0);
    let (c, e) = (q(&c), q(&e));
    let rc = Nd::from_f32(&[8, 12], &c.to_vec().unwrap());
    let re = Nd::from_f32(&[8, 12], &e.to_vec().unwrap());
    for &(name, f, r) in cmp {
        assert_close(name, &f(&a, &b).unwrap(), &ra.zip(&rb, r), 0.0, 0.0);
        assert_close(
            &format!("{name} aligned"),
            &f(&c, &e).unwrap(),
            &rc.zip(&re, r),
            0.0,
            0.0,
        );
    }
}

/// Every scalar variant on a transposed view (the strided scalar kernel) and on an aligned
/// contiguous tensor (the vec4 kernel). Inputs are multiples of 0.5, so the comparisons with
/// 2.0 meet ties.
#[test]
fn scalar_variants() {
    let d = dev();
    let mut rng = Rng::new(11);
    let q: Vec<f32> = (0..64).map(|_| 0.5 * (1 + rng.below(8)) as f32).collect();
    let t = Tensor::from_slice(&q, &[16, 4], &d).unwrap();
    let r = Nd::from_f32(&[16, 4], &q);
    let views = [
        ("transposed [4, 16]", t.t().unwrap(), r.permute(&[1, 0])),
        ("aligned [16, 4]", t.clone(), r.clone()),
    ];
    assert!(q.iter().filter(|&&v| v == 2.0).count() > 3, "ties with 2.0");
    type Case = (&'static str, GpuFn, fn(f64) -> f64);
    let cases: &[Case] = &[
        ("add_scalar", |t| t.add_scalar(1.5), |x| x + 1.5),
        ("sub_scalar", |t| t.sub_scalar(1.5), |x| x - 1.5),
        ("mul_scalar", |t| t.mul_scalar(-3.0), |x| x * -3.0),
        ("div_scalar", |t| t.div_scalar(3.0), |x| x / 3.0),
        ("pow_scalar", |t| t.pow_scalar(3.0), |x| x.powi(3)),
        ("maximum_scalar", |t| t.maximum_scalar(2.0), |x| x.max(2.0)),
        ("minimum_scalar", |t| t.minimum_scalar(2.0), |x| x.min(2.0)),
        ("eq_scalar", |t| t.eq_scalar(2.0), |x| b2f(x == 2.0)),
        ("ne_scalar", |t| t.ne_scalar(2.0), |x| b2f(x != 2.0)),
        ("lt_scalar", |t| t.lt_scalar(2.0), |x| b2f(x < 2.0)),
        ("le_scalar", |t| t.le_scalar(2.0), |x| b2f(x <= 2.0)),
        ("gt_scalar", |t| t.gt_scalar(2.0), |x| b2f(x > 2.0)),
        ("ge_scalar", |t| t.ge_scalar(2.0), |x| b2f(x >= 2.0)),
        ("rsub_scalar", |t| t.rsub_scalar(1.0), |x| 1.0 - x),
        ("rdiv_scalar", |t| t.rdiv_scalar(1.0), |x| 1.0 / x),
    ];
    for &(name, f, reference) in cases {
        for (view, t, r) in &views {
            let got = f(t).unwrap();
            assert_close(
                &format!("{name} on {view}"),
                &got,
                &r.map(reference),
                1e-6,
                1e-5,
            );
        }
    }
}

#[test]
fn where_selects_with_broadcasting() {
    let d = dev();
    let mut rng = Rng::new(3);
    let cond_v: Vec<f32> = (0..15).map(|_| (rng.below(2)) as f32).collect();
    let cond = Tensor::from_slice(&cond_v, &[3, 5], &d).unwrap();
    let (a, ra) = rand_pair(&mut rng, &[2, 1, 5], -1.0, 1.0);
    let (b, rb) = rand_pair(&mut rng, &[3, 1], -1.0, 1.0);
    let got = cond.where_cond(&a, &b).unwrap();
    let rc = Nd::from_f32(&[3, 5], &cond_v);
    // where(c, a, b) = c * a + (1 - c) * b for c in {0, 1}
    let want = rc
        .zip(&ra, |c, a| c * a)
        .zip(&rc.zip(&rb, |c, b| (1.0 - c) * b), |x, y| x + y);
    assert_close("where", &got, &want, 1e-7, 0.0);
}

#[test]
fn maximum_and_minimum_propagate_nan() {
    let d = dev();
    let a = Tensor::from_slice(&[f32::NAN, 1.0], &[2], &d).unwrap();
    let b = Tensor::from_slice(&[0.0, f32::NAN], &[2], &d).unwrap();
    assert!(a
        .maximum(&b)
        .unwrap()
        .to_vec()
        .unwrap()
        .iter()
        .all(|v| v.is_nan()));
    assert!(a
        .minimum(&b)
        .unwrap()
        .to_vec()
        .unwrap()
        .iter()
        .all(|v| v.is_nan()));
}

#[test]
fn shape_errors_are_err() {
    let d = dev();
    let a = Tensor::zeros(&[3, 2], &d).unwrap();
    let b = Tensor::zeros(&[4, 2], &d).unwrap();
    let e = a.add(&b).unwrap_err().to_string();
    assert!(
        e.contains("add") && e.contains("[3, 2]") && e.contains("[4, 2]"),
        "{e}"
    );
    assert!(a.where_cond(&a, &Tensor::zeros(&[5], &d).unwrap()).is_err());
    assert!(a.clamp(1.0, -1.0).is_err());
}

/// Contiguous operands in whole vec4s take the vec4 kernels (unary, binary, binary with a
/// scalar, unary gradients); the same values at an unaligned offset take the scalar kernels,
/// which the other tests check against references and finite differences. Both must agree
/// exactly, for every op, with and without an aligned view offset.
#[test]
fn vec4_kernels_match_scalar_kernels() {
    let d = dev();
    let mut rng = Rng::new(404);
    let n = 4 * 259;
    let v = rng.vec(n, 0.1, 3.0);
    let w = rng.vec(n, -2.0, 2.0);
    // Aligned: contiguous from offset 0, and rows 1.. of a [n / 4 + 1, 4] tensor (offset 4).
    // Unaligned: the same values from offset 1 of a longer buffer.
    let at = |vals: &[f32], pad: usize| {
        let mut data = vec![0.5; pad];
        data.extend_from_slice(vals);
        Tensor::from_slice(&data, &[data.len()], &d)
            .unwrap()
            .narrow(0, pad, vals.len())
            .unwrap()
            .reshape(&[4, 259])
            .unwrap()
    };
    let (x0, x4, x1) = (at(&v, 0), at(&v, 4), at(&v, 1));
    let (y0, y4, y1) = (at(&w, 0), at(&w, 4), at(&w, 1));
    let same = |what: &str, a: &Tensor, b: &Tensor| {
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{what}");
    };
    let unary: &[(&str, GpuFn)] = &[
        ("neg", Tensor::neg),
        ("abs", Tensor::abs),
        ("exp", Tensor::exp),
        ("log", Tensor::log),
        ("sqrt", Tensor::sqrt),
        ("rsqrt", Tensor::rsqrt),
        ("relu", Tensor::relu),
        ("sigmoid", Tensor::sigmoid),
        ("tanh", Tensor::tanh),
        ("gelu", Tensor::gelu),
        ("silu", Tensor::silu),
    ];
    for &(name, f) in unary {
        let want = f(&x1).unwrap();
        same(name, &f(&x0).unwrap(), &want);
        same(&format!("{name} at offset 4"), &f(&x4).unwrap(), &want);
        // The gradient: unary_bwd on aligned and unaligned operands.
        let grads: Vec<Vec<f32>> = [&x0, &x1]
            .into_iter()
            .map(|x| {
                let x = x.detach().requires_grad();
                f(&x)
                    .unwrap()
                    .mul(&y0)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                x.grad().unwrap().to_vec().unwrap()
            })
            .collect();
        assert_eq!(grads[0], grads[1], "{name} gradient");
    }
    let binary: &[(&str, BinFn)] = &[
        ("add", Tensor::add),
        ("sub", Tensor::sub),
        ("mul", Tensor::mul),
        ("div", Tensor::div),
        ("pow", Tensor::pow),
        ("maximum", Tensor::maximum),
        ("lt", Tensor::lt),
    ];
    for &(name, f) in binary {
        let want = f(&x1, &y1).unwrap();
        same(name, &f(&x0, &y0).unwrap(), &want);
        same(&format!("{name} at offset 4"), &f(&x4, &y4).unwrap(), &want);
        same(&format!("{name} mixed"), &f(&x4, &y0).unwrap(), &want);
    }
    for (name, s) in [("mul_scalar", 1.5f32), ("add_scalar", -0.25)] {
        let f = if name == "mul_scalar" {
            Tensor::mul_scalar
        } else {
            Tensor::add_scalar
        };
        same(name, &f(&x0, s).unwrap(), &f(&x1, s).unwrap());
    }
    same(
        "rsub_scalar",
        &x0.rsub_scalar(2.0).unwrap(),
        &x1.rsub_scalar(2.0).unwrap(),
    );
}

/// The strided four-at-a-time kernels (transposing copies and broadcast operands whose merged
/// innermost axis is a multiple of 4) and their fallbacks (odd or unaligned innermost runs),
/// against the f64 reference.
#[test]
fn strided_operands_match_the_reference() {
    let mut rng = Rng::new(505);
    // (shape, permutation): the permuted view keeps the last two axes, merged into one run.
    for (shape, perm) in [
        (vec![3usize, 5, 4, 7], vec![1usize, 0, 2, 3]), // run 28: strided4
        (vec![2, 6, 3, 4], vec![1, 0, 2, 3]),           // run 12: strided4
        (vec![2, 3, 5, 3], vec![1, 0, 2, 3]),           // run 15: general
        (vec![4, 3, 8], vec![2, 1, 0]),                 // innermost stride 12: general
    ] {
        let (x, xn) = rand_pair(&mut rng, &shape, -2.0, 2.0);
        let iperm: Vec<isize> = perm.iter().map(|&a| a as isize).collect();
        let view = x.permute(&iperm).unwrap();
        let want = xn.permute(&perm);
        assert_close(
            &format!("copy {shape:?} {perm:?}"),
            &view.contiguous().unwrap(),
            &want,
            0.0,
            0.0,
        );
        assert_close(
            &format!("relu {shape:?} {perm:?}"),
            &view.relu().unwrap(),
            &want.map(|v| v.max(0.0)),
            0.0,
            0.0,
        );
        // A second operand broadcast along the innermost run (a per-channel bias) and one
        // contiguous: both paths of the binary kernel.
        let mut bshape = want.shape.clone();
        let r = bshape.len();
        bshape[r - 1] = 1;
        let (b, bn) = rand_pair(&mut rng, &bshape, -1.0, 1.0);
        let sum = view.add(&b).unwrap();
        let bb = |idx: &[usize]| {
            let mut i = idx.to_vec();
            i[r - 1] = 0;
            bn.at(&i)
        };
        let want_sum = Nd::new(
            &want.shape,
            (0..want.data.len())
                .map(|i| {
                    let idx = unravel(i, &want.shape);
                    want.at(&idx) + bb(&idx)
                })
                .collect(),
        );
        assert_close(
            &format!("add broadcast {shape:?} {perm:?}"),
            &sum,
            &want_sum,
            1e-6,
            0.0,
        );
        let (c, cn) = rand_pair(&mut rng, &want.shape, -1.0, 1.0);
        assert_close(
            &format!("mul {shape:?} {perm:?}"),
            &view.mul(&c).unwrap(),
            &want.zip(&cn, |p, q| p * q),
            1e-6,
            0.0,
        );
    }
    // From offset 2 of a buffer: not 4-aligned, the general kernel.
    let (x, xn) = rand_pair(&mut rng, &[2 + 2 * 3 * 8], -2.0, 2.0);
    let view = x
        .narrow(0, 2, 48)
        .unwrap()
        .reshape(&[2, 3, 8])
        .unwrap()
        .permute(&[1, 0, 2])
        .unwrap();
    let want = Nd::new(&[2, 3, 8], xn.data[2..].to_vec()).permute(&[1, 0, 2]);
    assert_close(
        "copy from offset 2",
        &view.contiguous().unwrap(),
        &want,
        0.0,
        0.0,
    );
}

/// The largest tensors whose positions are split in float arithmetic (just below 2^22
/// elements), transposed: every element lands where the integer arithmetic puts it.
#[test]
fn float_index_split_is_exact_up_to_its_bound() {
    let d = dev();
    let (r, c) = (2049usize, 2047usize);
    assert!(r * c < 1 << 22);
    let v: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
    let x = Tensor::from_slice(&v, &[r, c], &d).unwrap();
    let t = x.t().unwrap().contiguous().unwrap().to_vec().unwrap();
    for (k, got) in t.iter().enumerate() {
        let (j, i) = (k / r, k % r);
        assert_eq!(
            *got,
            (i * c + j) as f32,
            "element ({j}, {i}) of the transpose"
        );
    }
}
