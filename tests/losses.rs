//! Every loss and reduction against an f64 reference: values and input gradients, including
//! `ignore_index`, label smoothing and extra spatial axes. Also `Tensor::normal` with a mean
//! and standard deviation other than 0 and 1, and `mean_all`.

mod common;

use common::*;
use kiln::loss::{self, CrossEntropyOptions, Reduction};
use kiln::Tensor;

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

/// Reduces per-element losses as PyTorch does: `count` is the mean's denominator.
fn reduce(per: &[f64], shape: &[usize], reduction: Reduction, count: f64) -> Nd {
    match reduction {
        Reduction::None => Nd::new(shape, per.to_vec()),
        Reduction::Sum => Nd::new(&[], vec![per.iter().sum()]),
        Reduction::Mean => Nd::new(&[], vec![per.iter().sum::<f64>() / count]),
    }
}

/// The upstream gradient each reduction's output gets in these tests, and the factor the
/// reduction applies to element i's gradient.
fn upstream(rng: &mut Rng, shape: &[usize], reduction: Reduction) -> (Vec<f32>, Vec<usize>) {
    match reduction {
        Reduction::None => (rng.vec(shape.iter().product(), -1.0, 1.0), shape.to_vec()),
        _ => (vec![rng.uniform(0.5, 1.5)], vec![]),
    }
}

fn scale(w: &[f32], reduction: Reduction, i: usize, count: f64) -> f64 {
    match reduction {
        Reduction::None => w[i] as f64,
        Reduction::Sum => w[0] as f64,
        Reduction::Mean => w[0] as f64 / count,
    }
}

/// `(N, C, d)` class scores and targets with ignored entries: position (n, j) of the targets
/// selects class `t[n, j]` along axis 1.
struct ClassCase {
    n: usize,
    c: usize,
    d: usize,
    targets: Vec<f32>,
}

impl ClassCase {
    fn new(rng: &mut Rng, n: usize, c: usize, d: usize, ignore: usize) -> ClassCase {
        let mut targets: Vec<f32> = (0..n * d).map(|_| rng.below(c) as f32).collect();
        // At least two ignored positions, whatever the random draw.
        targets[0] = ignore as f32;
        targets[n * d - 1] = ignore as f32;
        ClassCase { n, c, d, targets }
    }
    fn x_shape(&self) -> Vec<usize> {
        if self.d == 1 {
            vec![self.n, self.c]
        } else {
            vec![self.n, self.c, self.d]
        }
    }
    fn t_shape(&self) -> Vec<usize> {
        if self.d == 1 {
            vec![self.n]
        } else {
            vec![self.n, self.d]
        }
    }
    fn at(&self, n: usize, c: usize, j: usize) -> usize {
        (n * self.c + c) * self.d + j
    }
}

#[test]
fn nll_loss_matches_f64() {
    let dv = dev();
    let mut rng = Rng::new(1);
    for (n, c, d) in [(6, 4, 1), (3, 5, 7)] {
        for ignore in [None, Some(2)] {
            for reduction in REDUCTIONS {
                let case = ClassCase::new(&mut rng, n, c, d, ignore.unwrap_or(1));
                let lp = rng.vec(n * c * d, -3.0, -0.1);
                let x = Tensor::from_slice(&lp, &case.x_shape(), &dv)
                    .unwrap()
                    .requires_grad();
                let t = Tensor::from_slice(&case.targets, &case.t_shape(), &dv).unwrap();
                let what = format!("nll {n}x{c}x{d} ignore {ignore:?} {reduction:?}");
                let y = loss::nll_loss(&x, &t, reduction, ignore).unwrap();
                let kept = |k: usize| Some(case.targets[k] as usize) != ignore;
                let count = (0..n * d).filter(|&k| kept(k)).count() as f64;
                let per: Vec<f64> = (0..n * d)
                    .map(|k| {
                        let (b, j) = (k / d, k % d);
                        if kept(k) {
                            -lp[case.at(b, case.targets[k] as usize, j)] as f64
                        } else {
                            0.0
                        }
                    })
                    .collect();
                assert_close(
                    &what,
                    &y,
                    &reduce(&per, &case.t_shape(), reduction, count),
                    1e-5,
                    1e-5,
                );
                let (w, ws) = upstream(&mut rng, &case.t_shape(), reduction);
                y.backward_with(Some(&Tensor::from_slice(&w, &ws, &dv).unwrap()), false)
                    .unwrap();
                let mut g = vec![0.0; n * c * d];
                for k in (0..n * d).filter(|&k| kept(k)) {
                    let (b, j) = (k / d, k % d);
                    g[case.at(b, case.targets[k] as usize, j)] = -scale(&w, reduction, k, count);
                }
                assert_close(
                    &format!("{what} gradient"),
                    &x.grad().unwrap(),
                    &Nd::new(&case.x_shape(), g),
                    1e-6,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn cross_entropy_matches_f64() {
    let dv = dev();
    let mut rng = Rng::new(2);
    for (n, c, d) in [(5, 3, 1), (2, 4, 3)] {
        for (smoothing, ignore) in [(0.0, None), (0.2, Some(0)), (0.0, Some(1))] {
            for reduction in REDUCTIONS {
                let case = ClassCase::new(&mut rng, n, c, d, ignore.unwrap_or(2));
                let z = rng.vec(n * c * d, -3.0, 3.0);
                let x = Tensor::from_slice(&z, &case.x_shape(), &dv)
                    .unwrap()
                    .requires_grad();
                let t = Tensor::from_slice(&case.targets, &case.t_shape(), &dv).unwrap();
                let opts = CrossEntropyOptions {
                    reduction,
                    label_smoothing: smoothing,
                    ignore_index: ignore,
                };
                let what = format!(
                    "cross_entropy {n}x{c}x{d} s {smoothing} ignore {ignore:?} {reduction:?}"
                );
                let y = loss::cross_entropy(&x, &t, &opts).unwrap();
                let kept = |k: usize| Some(case.targets[k] as usize) != ignore;
                let count = (0..n * d).filter(|&k| kept(k)).count() as f64;
                let s = smoothing as f64;
                // Per position: log-softmax over the classes, the smoothed target q, and
                // -sum q log p.
                let mut per = vec![0.0; n * d];
                let mut dist = vec![0.0; n * c * d];
                let mut probs = vec![0.0; n * c * d];
                for (k, per_k) in per.iter_mut().enumerate() {
                    let (b, j) = (k / d, k % d);
                    let zs: Vec<f64> = (0..c).map(|ci| z[case.at(b, ci, j)] as f64).collect();
                    let m = zs.iter().cloned().fold(f64::MIN, f64::max);
                    let lse = m + zs.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                    for ci in 0..c {
                        probs[case.at(b, ci, j)] = (zs[ci] - lse).exp();
                    }
                    if !kept(k) {
                        continue;
                    }
                    let target = case.targets[k] as usize;
                    for ci in 0..c {
                        let q = (1.0 - s) * f64::from(u8::from(ci == target)) + s / c as f64;
                        dist[case.at(b, ci, j)] = q;
                        *per_k -= q * (zs[ci] - lse);
                    }
                }
                assert_close(
                    &what,
                    &y,
                    &reduce(&per, &case.t_shape(), reduction, count),
                    1e-5,
                    1e-5,
                );
                let (w, ws) = upstream(&mut rng, &case.t_shape(), reduction);
                y.backward_with(Some(&Tensor::from_slice(&w, &ws, &dv).unwrap()), false)
                    .unwrap();
                // d/dz of -sum q log softmax(z) is softmax(z) - q (q sums to 1).
                let mut g = vec![0.0; n * c * d];
                for k in (0..n * d).filter(|&k| kept(k)) {
                    let (b, j) = (k / d, k % d);
                    for ci in 0..c {
                        let i = case.at(b, ci, j);
                        g[i] = scale(&w, reduction, k, count) * (probs[i] - dist[i]);
                    }
                }
                assert_close(
                    &format!("{what} gradient"),
                    &x.grad().unwrap(),
                    &Nd::new(&case.x_shape(), g),
                    1e-6,
                    1e-5,
                );
            }
        }
    }
}

/// Elementwise losses: `(per-element loss, its derivatives in the first and second inputs)`
/// in f64.
type Pointwise = fn(f64, f64) -> (f64, f64, f64);

#[test]
fn mse_and_bce_with_logits_match_f64() {
    let dv = dev();
    let mut rng = Rng::new(3);
    let mse: Pointwise = |p, t| ((p - t).powi(2), 2.0 * (p - t), -2.0 * (p - t));
    let bce: Pointwise = |x, t| {
        let sig = 1.0 / (1.0 + (-x).exp());
        (x.max(0.0) - x * t + (-x.abs()).exp().ln_1p(), sig - t, -x)
    };
    for shape in [vec![7usize], vec![3, 5, 2]] {
        let numel: usize = shape.iter().product();
        for reduction in REDUCTIONS {
            for (name, f) in [("mse_loss", mse), ("bce_with_logits", bce)] {
                let a = rng.vec(numel, -4.0, 4.0);
                let b = if name == "mse_loss" {
                    rng.vec(numel, -4.0, 4.0)
                } else {
                    rng.vec(numel, 0.0, 1.0)
                };
                let x = Tensor::from_slice(&a, &shape, &dv).unwrap().requires_grad();
                let t = Tensor::from_slice(&b, &shape, &dv).unwrap().requires_grad();
                let y = if name == "mse_loss" {
                    loss::mse_loss(&x, &t, reduction)
                } else {
                    loss::binary_cross_entropy_with_logits(&x, &t, reduction)
                }
                .unwrap();
                let what = format!("{name} {shape:?} {reduction:?}");
                let per: Vec<f64> = (0..numel).map(|i| f(a[i] as f64, b[i] as f64).0).collect();
                assert_close(
                    &what,
                    &y,
                    &reduce(&per, &shape, reduction, numel as f64),
                    1e-5,
                    1e-5,
                );
                let (w, ws) = upstream(&mut rng, &shape, reduction);
                y.backward_with(Some(&Tensor::from_slice(&w, &ws, &dv).unwrap()), false)
                    .unwrap();
                let s = |i| scale(&w, reduction, i, numel as f64);
                let g: Vec<f64> = (0..numel)
                    .map(|i| s(i) * f(a[i] as f64, b[i] as f64).1)
                    .collect();
                assert_close(
                    &format!("{what} gradient"),
                    &x.grad().unwrap(),
                    &Nd::new(&shape, g),
                    1e-5,
                    1e-5,
                );
                let g: Vec<f64> = (0..numel)
                    .map(|i| s(i) * f(a[i] as f64, b[i] as f64).2)
                    .collect();
                assert_close(
                    &format!("{what} target gradient"),
                    &t.grad().expect("the target gets a gradient"),
                    &Nd::new(&shape, g),
                    1e-5,
                    1e-5,
                );
            }
        }
    }
}

/// `Tensor::normal(mean, std)`: its empirical distribution against the normal CDF in f64
/// (Kolmogorov-Smirnov at the 1% level, 1.63 / sqrt(n)), and its moments within 5 standard
/// errors. The seed is fixed, so the result is deterministic.
#[test]
fn normal_with_mean_and_std_follows_its_distribution() {
    let d = dev();
    let n = 20000;
    for (mean, std) in [(3.0f32, 0.5f32), (-2.0, 4.0)] {
        let mut v: Vec<f64> = Tensor::normal(&[n], mean, std, 17, &d)
            .unwrap()
            .to_vec()
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        let (mean, std) = (mean as f64, std as f64);
        let m = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
        let se = std / (n as f64).sqrt();
        assert!((m - mean).abs() < 5.0 * se, "mean {m}, want {mean}");
        // The variance's standard error is std^2 sqrt(2 / n).
        assert!(
            (var - std * std).abs() < 5.0 * std * std * (2.0 / n as f64).sqrt(),
            "variance {var}, want {}",
            std * std
        );
        v.sort_by(f64::total_cmp);
        let cdf = |x: f64| 0.5 * (1.0 + erf((x - mean) / (std * 2f64.sqrt())));
        let ks = v
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = cdf(x);
                (f - i as f64 / n as f64)
                    .abs()
                    .max(((i + 1) as f64 / n as f64 - f).abs())
            })
            .fold(0.0, f64::max);
        assert!(
            ks < 1.63 / (n as f64).sqrt(),
            "normal({mean}, {std}): KS statistic {ks}"
        );
    }
    assert!(Tensor::normal(&[2], 0.0, -1.0, 0, &d).is_err());
    assert!(Tensor::normal(&[2], 0.0, f32::NAN, 0, &d).is_err());
}

#[test]
fn mean_all_matches_f64() {
    let mut rng = Rng::new(4);
    for shape in [vec![1031usize], vec![7, 13], vec![3, 5, 7], vec![]] {
        let (t, r) = rand_pair(&mut rng, &shape, -3.0, 3.0);
        let want = r.data.iter().sum::<f64>() / r.data.len() as f64;
        assert_close(
            &format!("mean_all {shape:?}"),
            &t.mean_all().unwrap(),
            &Nd::new(&[], vec![want]),
            1e-6,
            1e-5,
        );
        // Of a transposed view too.
        if shape.len() == 2 {
            assert_close(
                &format!("mean_all of {shape:?} transposed"),
                &t.t().unwrap().mean_all().unwrap(),
                &Nd::new(&[], vec![want]),
                1e-6,
                1e-5,
            );
        }
    }
    let empty = Tensor::zeros(&[0, 3], &dev()).unwrap();
    assert!(empty.mean_all().unwrap().to_scalar().unwrap().is_nan());
}

/// Rank-1 logits `(C)` with a rank-0 target, as `torch.nn.functional.cross_entropy` takes
/// one unbatched sample.
#[test]
fn cross_entropy_of_one_unbatched_sample() {
    let d = dev();
    let z = [0.5f32, -1.0, 2.0, 0.25];
    let x = Tensor::from_slice(&z, &[4], &d).unwrap().requires_grad();
    let t = Tensor::scalar(2.0, &d).unwrap();
    let y = loss::cross_entropy(&x, &t, &Default::default()).unwrap();
    let lse = z.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
    assert_close(
        "unbatched cross_entropy",
        &y,
        &Nd::new(&[], vec![lse - 2.0]),
        1e-6,
        1e-6,
    );
    y.backward().unwrap();
    let g: Vec<f64> = z
        .iter()
        .enumerate()
        .map(|(i, &v)| (v as f64 - lse).exp() - f64::from(u8::from(i == 2)))
        .collect();
    assert_close(
        "unbatched gradient",
        &x.grad().unwrap(),
        &Nd::new(&[4], g),
        1e-6,
        1e-6,
    );
    assert!(loss::cross_entropy(
        &x,
        &Tensor::from_slice(&[2.0], &[1], &d).unwrap(),
        &Default::default()
    )
    .is_err());
}

/// A class target outside `0..C` or a fractional one cannot be checked on the host (targets
/// stay on the GPU): the kernel reports it and the next readback is an `Err` naming it.
#[test]
fn out_of_range_targets_are_err_at_the_next_readback() {
    // A device of its own: the fault would fail a readback of a test running beside it.
    let d = own_device();
    let logits = Tensor::from_slice(&[0.5, -1.0, 2.0, 0.25], &[2, 2], &d).unwrap();
    for bad in [2.0f32, -1.0, 0.5] {
        let t = Tensor::from_slice(&[0.0, bad], &[2], &d).unwrap();
        let l = loss::cross_entropy(&logits, &t, &Default::default()).unwrap();
        let e = l.to_scalar().unwrap_err().to_string();
        assert!(e.contains(&format!("index {bad}")), "target {bad}: {e}");
        let l = loss::nll_loss(&logits, &t, Reduction::Sum, None).unwrap();
        assert!(l.to_scalar().is_err(), "nll_loss, target {bad}");
    }
    // The fault is cleared by the readback that reports it.
    let t = Tensor::from_slice(&[0.0, 1.0], &[2], &d).unwrap();
    assert!(loss::cross_entropy(&logits, &t, &Default::default())
        .unwrap()
        .to_scalar()
        .is_ok());
}
