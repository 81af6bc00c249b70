//! The ops added for users' models: log1p, softplus, sin, cos, tanh-GELU, masked_fill,
//! tril/triu, split/chunk, logsumexp, flip, repeat, one_hot, pad, cumsum, nearest and bilinear
//! upsampling, and the `&Tensor` operators. Values against f64 references written here from
//! PyTorch's definitions, gradients by finite differences, on odd and vec4-aligned shapes.

mod common;

use common::*;
use kiln::{Result, Tensor};

type UnaryFn = fn(&Tensor) -> Result<Tensor>;

#[test]
fn new_unary_ops_match_f64_and_finite_differences() {
    let softplus_ref = |beta: f64, threshold: f64| {
        move |x: f64| {
            if beta * x > threshold {
                x
            } else {
                (beta * x).exp().ln_1p() / beta
            }
        }
    };
    let gelu_tanh = |x: f64| {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (k * (x + 0.044715 * x.powi(3))).tanh())
    };
    // Maclaurin series, exact to about 1e-12 in f64 for |x| <= 3.
    let erf = |x: f64| {
        let (mut term, mut sum) = (x, 0.0);
        for n in 0..80 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    };
    type Case = (&'static str, UnaryFn, Box<dyn Fn(f64) -> f64>, f32, f32);
    let cases: Vec<Case> = vec![
        ("log1p", Tensor::log1p, Box::new(f64::ln_1p), -0.9, 3.0),
        ("sin", Tensor::sin, Box::new(f64::sin), -6.0, 6.0),
        ("cos", Tensor::cos, Box::new(f64::cos), -6.0, 6.0),
        ("erf", Tensor::erf, Box::new(erf), -3.0, 3.0),
        ("trunc", Tensor::trunc, Box::new(f64::trunc), -5.0, 5.0),
        (
            "gelu_tanh",
            Tensor::gelu_tanh,
            Box::new(gelu_tanh),
            -5.0,
            5.0,
        ),
        (
            "softplus",
            |t| t.softplus(1.0, 20.0),
            Box::new(softplus_ref(1.0, 20.0)),
            -30.0,
            30.0,
        ),
        (
            "softplus beta 2, threshold 5",
            |t| t.softplus(2.0, 5.0),
            Box::new(softplus_ref(2.0, 5.0)),
            -4.0,
            4.0,
        ),
    ];
    let mut rng = Rng::new(1);
    for (name, f, reference, lo, hi) in &cases {
        // Odd (strided kernel) and aligned (vec4 kernel) shapes.
        for shape in [vec![3usize, 7], vec![4, 64]] {
            let (t, r) = rand_pair(&mut rng, &shape, *lo, *hi);
            assert_close(
                &format!("{name} {shape:?}"),
                &f(&t).unwrap(),
                &r.map(reference),
                2e-6,
                2e-6,
            );
        }
        // Away from softplus's threshold, where the derivative jumps.
        let (lo, hi) = if name.starts_with("softplus") {
            (-1.5, 1.5)
        } else {
            (*lo, *hi)
        };
        let (lo, hi) = if *name == "log1p" {
            (-0.5, 2.0)
        } else {
            (lo, hi)
        };
        if *name == "trunc" {
            // A step function: finite differences across a step are meaningless; the
            // gradient is zero everywhere.
            let x = Tensor::from_slice(&[-2.5, -0.3, 0.7, 3.2], &[4], &dev())
                .unwrap()
                .requires_grad();
            let y = x.trunc().unwrap();
            assert_eq!(y.to_vec().unwrap(), vec![-2.0, 0.0, 0.0, 3.0]);
            y.sum(&[], false).unwrap().backward().unwrap();
            assert_eq!(x.grad().unwrap().to_vec().unwrap(), vec![0.0; 4]);
            continue;
        }
        check(name, vec![smooth(&mut rng, &[2, 5], lo, hi)], &|x| f(&x[0]));
    }
    // log1p keeps its accuracy near 0, where log(1 + x) loses every digit.
    let tiny = [1e-7f32, -3e-8, 1e-20, 2.5e-4];
    let t = Tensor::from_slice(&tiny, &[4], &dev()).unwrap();
    let want: Vec<f64> = tiny.iter().map(|&x| (x as f64).ln_1p()).collect();
    assert_close_slice(
        "log1p near 0",
        &t.log1p().unwrap().to_vec().unwrap(),
        &want,
        0.0,
        1e-6,
    );
    let edge = Tensor::from_slice(&[-1.0, -2.0, f32::INFINITY], &[3], &dev()).unwrap();
    let v = edge.log1p().unwrap().to_vec().unwrap();
    assert!(
        v[0] == f32::NEG_INFINITY && v[1].is_nan() && v[2] == f32::INFINITY,
        "{v:?}"
    );
    assert!(edge.softplus(0.0, 20.0).is_err());
    assert!(edge.softplus(f32::NAN, 20.0).is_err());
}

#[test]
fn masked_fill_tril_triu() {
    let d = dev();
    let mut rng = Rng::new(2);
    let (x, r) = rand_pair(&mut rng, &[2, 3, 5], -1.0, 1.0);
    let mask_v: Vec<f32> = (0..15).map(|_| rng.below(2) as f32).collect();
    let mask = Tensor::from_slice(&mask_v, &[3, 5], &d).unwrap();
    let want: Vec<f64> = (0..30)
        .map(|i| {
            if mask_v[i % 15] != 0.0 {
                -7.5
            } else {
                r.data[i]
            }
        })
        .collect();
    assert_close(
        "masked_fill",
        &x.masked_fill(&mask, -7.5).unwrap(),
        &Nd::new(&[2, 3, 5], want),
        0.0,
        0.0,
    );
    let ninf = x
        .masked_fill(&mask, f32::NEG_INFINITY)
        .unwrap()
        .to_vec()
        .unwrap();
    assert!(ninf
        .iter()
        .enumerate()
        .all(|(i, &v)| (mask_v[i % 15] != 0.0) == (v == f32::NEG_INFINITY)));
    assert!(
        x.masked_fill(&Tensor::ones(&[4, 5], &d).unwrap(), 0.0)
            .is_err(),
        "mask does not broadcast"
    );
    assert!(
        mask.masked_fill(&Tensor::ones(&[2, 3, 5], &d).unwrap(), 0.0)
            .is_err(),
        "mask larger than the tensor"
    );
    check(
        "masked_fill",
        vec![smooth(&mut rng, &[3, 5], -1.0, 1.0)],
        &|t| t[0].masked_fill(&Tensor::from_slice(&mask_v, &[3, 5], &dev()).unwrap(), 2.0),
    );
    for k in [-1i64, 0, 2, 9, -9] {
        let keep = |i: usize, lower: bool| {
            let (row, col) = ((i / 5) % 3, i % 5);
            let dd = col as i64 - row as i64;
            if lower {
                dd <= k
            } else {
                dd >= k
            }
        };
        for lower in [true, false] {
            let got = if lower { x.tril(k) } else { x.triu(k) }.unwrap();
            let want: Vec<f64> = (0..30)
                .map(|i| if keep(i, lower) { r.data[i] } else { 0.0 })
                .collect();
            assert_close(
                &format!("{} {k}", if lower { "tril" } else { "triu" }),
                &got,
                &Nd::new(&[2, 3, 5], want),
                0.0,
                0.0,
            );
        }
    }
    assert!(Tensor::ones(&[3], &d).unwrap().tril(0).is_err());
}

#[test]
fn split_and_chunk() {
    let mut rng = Rng::new(3);
    let (x, r) = rand_pair(&mut rng, &[7, 4], -1.0, 1.0);
    let parts = x.split(3, 0).unwrap();
    assert_eq!(
        parts.iter().map(|p| p.dims()[0]).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    for (k, p) in parts.iter().enumerate() {
        assert!(p.shares_storage(&x), "a view");
        let want = r.data[k * 12..(k * 12 + p.numel())].to_vec();
        assert_close(
            &format!("split part {k}"),
            p,
            &Nd::new(p.dims(), want),
            0.0,
            0.0,
        );
    }
    // torch.chunk(7 rows, 3) gives 3, 3, 1; chunk(4 columns, 3) gives 2, 2.
    assert_eq!(
        x.chunk(3, 0)
            .unwrap()
            .iter()
            .map(|p| p.dims()[0])
            .collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    let cols = x.chunk(3, 1).unwrap();
    assert_eq!(
        cols.iter().map(|p| p.dims()[1]).collect::<Vec<_>>(),
        vec![2, 2]
    );
    let want: Vec<f64> = (0..7)
        .flat_map(|i| r.data[i * 4 + 2..i * 4 + 4].to_vec())
        .collect();
    assert_close("chunk columns", &cols[1], &Nd::new(&[7, 2], want), 0.0, 0.0);
    assert!(x.split(0, 0).is_err() && x.chunk(0, 0).is_err() && x.split(2, 2).is_err());
    check("split", vec![smooth(&mut rng, &[5, 3], -1.0, 1.0)], &|t| {
        let p = t[0].split(2, 0)?;
        p[0].mul(&p[1])?.sum_all()?.add(&p[2].sum_all()?)
    });
}

#[test]
fn logsumexp_matches_f64() {
    let mut rng = Rng::new(4);
    let (x, r) = rand_pair(&mut rng, &[3, 4, 5], -30.0, 30.0);
    for (axes, keep) in [
        (&[1isize][..], false),
        (&[-1][..], true),
        (&[0, 2][..], false),
        (&[][..], false),
    ] {
        let norm: Vec<usize> = if axes.is_empty() {
            vec![0, 1, 2]
        } else {
            let mut a: Vec<usize> = axes.iter().map(|&a| (a + 3) as usize % 3).collect();
            a.sort();
            a
        };
        let want = r.reduce(&norm, |v| {
            let m = v.iter().cloned().fold(f64::MIN, f64::max);
            m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        });
        let want = if keep {
            want
        } else {
            let shape: Vec<usize> = (0..3)
                .filter(|a| !norm.contains(a))
                .map(|a| [3, 4, 5][a])
                .collect();
            Nd::new(&shape, want.data)
        };
        assert_close(
            &format!("logsumexp {axes:?}"),
            &x.logsumexp(axes, keep).unwrap(),
            &want,
            1e-5,
            1e-6,
        );
    }
    let d = dev();
    let t = Tensor::from_slice(
        &[f32::NEG_INFINITY, f32::NEG_INFINITY, 1000.0, 1000.0],
        &[2, 2],
        &d,
    )
    .unwrap();
    let v = t.logsumexp(&[1], false).unwrap().to_vec().unwrap();
    assert_eq!(v[0], f32::NEG_INFINITY);
    assert!((v[1] as f64 - (1000.0 + 2f64.ln())).abs() < 1e-3, "{v:?}");
    check(
        "logsumexp",
        vec![smooth(&mut rng, &[3, 4], -2.0, 2.0)],
        &|t| t[0].logsumexp(&[1], false),
    );
}

#[test]
fn flip_repeat_pad() {
    let mut rng = Rng::new(5);
    let (x, r) = rand_pair(&mut rng, &[2, 3, 4], -1.0, 1.0);
    let want: Vec<f64> = (0..24)
        .map(|i| {
            let (a, b, c) = (i / 12, (i / 4) % 3, i % 4);
            r.at(&[a, 2 - b, 3 - c])
        })
        .collect();
    assert_close(
        "flip [1, 2]",
        &x.flip(&[1, -1]).unwrap(),
        &Nd::new(&[2, 3, 4], want),
        0.0,
        0.0,
    );
    assert!(x.flip(&[]).is_err() && x.flip(&[3]).is_err() && x.flip(&[1, 1]).is_err());
    // repeat(2, 1, 1, 3): a new leading axis, then [2, 3, 4] tiled to [2, 6, 3, 12]... as torch.
    let y = x.repeat(&[2, 1, 2, 3]).unwrap();
    assert_eq!(y.dims(), &[2, 2, 6, 12]);
    let want: Vec<f64> = (0..y.numel())
        .map(|i| {
            let idx = unravel(i, &[2, 2, 6, 12]);
            r.at(&[idx[1] % 2, idx[2] % 3, idx[3] % 4])
        })
        .collect();
    assert_close("repeat", &y, &Nd::new(&[2, 2, 6, 12], want), 0.0, 0.0);
    assert!(x.repeat(&[2, 2]).is_err(), "fewer repeats than axes");
    // pad (1, 2) on the last axis and (0, 1) on the one before, with 9.
    let y = x.pad(&[1, 2, 0, 1], 9.0).unwrap();
    assert_eq!(y.dims(), &[2, 4, 7]);
    let want: Vec<f64> = (0..56)
        .map(|i| {
            let (a, b, c) = (i / 28, (i / 7) % 4, i % 7);
            if b < 3 && (1..5).contains(&c) {
                r.at(&[a, b, c - 1])
            } else {
                9.0
            }
        })
        .collect();
    assert_close("pad", &y, &Nd::new(&[2, 4, 7], want), 0.0, 0.0);
    assert!(x.pad(&[1], 0.0).is_err() && x.pad(&[1; 8], 0.0).is_err());
    check("flip", vec![smooth(&mut rng, &[3, 4], -1.0, 1.0)], &|t| {
        t[0].flip(&[0, 1])?.mul(&t[0])
    });
    check("repeat", vec![smooth(&mut rng, &[2, 3], -1.0, 1.0)], &|t| {
        t[0].repeat(&[2, 2])?.square()
    });
    check("pad", vec![smooth(&mut rng, &[2, 3], -1.0, 1.0)], &|t| {
        t[0].pad(&[2, 1, 1, 0], 0.5)?.square()
    });
}

#[test]
fn one_hot_and_bad_classes() {
    let d = own_device();
    let idx = Tensor::from_slice(&[2.0, 0.0, 1.0, 2.0, 3.0, 0.0], &[2, 3], &d).unwrap();
    let y = idx.one_hot(4).unwrap();
    assert_eq!(y.dims(), &[2, 3, 4]);
    let want: Vec<f32> = [2usize, 0, 1, 2, 3, 0]
        .iter()
        .flat_map(|&c| (0..4).map(move |k| f32::from(u8::from(k == c))))
        .collect();
    assert_eq!(y.to_vec().unwrap(), want);
    assert!(idx.one_hot(0).is_err());
    let bad = Tensor::from_slice(&[1.0, 4.0], &[2], &d).unwrap();
    let e = bad.one_hot(4).unwrap().to_vec().unwrap_err().to_string();
    assert!(e.contains("index 4"), "{e}");
}

#[test]
fn cumsum_matches_f64() {
    let mut rng = Rng::new(6);
    for (shape, axis) in [
        (vec![3usize, 37], 1isize),
        (vec![37, 3], 0),
        (vec![2, 1, 5], 1),
        (vec![64], 0),
        (vec![2, 3, 33], -1),
    ] {
        let (x, r) = rand_pair(&mut rng, &shape, -1.0, 1.0);
        let a = (axis + shape.len() as isize) as usize % shape.len();
        let want: Vec<f64> = (0..r.data.len())
            .map(|i| {
                let idx = unravel(i, &shape);
                (0..=idx[a])
                    .map(|k| {
                        let mut j = idx.clone();
                        j[a] = k;
                        r.at(&j)
                    })
                    .sum()
            })
            .collect();
        assert_close(
            &format!("cumsum {shape:?} axis {axis}"),
            &x.cumsum(axis).unwrap(),
            &Nd::new(&shape, want),
            1e-5,
            1e-5,
        );
    }
    check("cumsum", vec![smooth(&mut rng, &[3, 7], -1.0, 1.0)], &|t| {
        t[0].cumsum(1)
    });
}

/// f64 reference of torch.nn.functional.interpolate for one (H, W) plane, pixel by pixel.
fn interpolate(
    x: &[f64],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    mode: &str,
    align: bool,
) -> Vec<f64> {
    let source = |i: usize, out: usize, len: usize| -> f64 {
        if align {
            if out > 1 {
                i as f64 * (len as f64 - 1.0) / (out as f64 - 1.0)
            } else {
                0.0
            }
        } else {
            ((i as f64 + 0.5) * len as f64 / out as f64 - 0.5).max(0.0)
        }
    };
    let mut out = Vec::with_capacity(oh * ow);
    for i in 0..oh {
        for j in 0..ow {
            if mode == "nearest" {
                let (y, xx) = ((i * h) / oh, (j * w) / ow);
                out.push(x[y * w + xx]);
                continue;
            }
            let (sy, sx) = (source(i, oh, h), source(j, ow, w));
            let (y0, x0) = (sy.floor() as usize, sx.floor() as usize);
            let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
            let (fy, fx) = (sy - y0 as f64, sx - x0 as f64);
            out.push(
                x[y0 * w + x0] * (1.0 - fy) * (1.0 - fx)
                    + x[y0 * w + x1] * (1.0 - fy) * fx
                    + x[y1 * w + x0] * fy * (1.0 - fx)
                    + x[y1 * w + x1] * fy * fx,
            );
        }
    }
    out
}

#[test]
fn upsampling_matches_f64() {
    let mut rng = Rng::new(7);
    let (n, c, h, w) = (2, 3, 4, 5);
    let (x, r) = rand_pair(&mut rng, &[n, c, h, w], -1.0, 1.0);
    for size in [[8usize, 10], [7, 3], [4, 5], [1, 1]] {
        for (mode, align) in [("nearest", false), ("bilinear", false), ("bilinear", true)] {
            let got = if mode == "nearest" {
                x.upsample_nearest2d(size)
            } else {
                x.upsample_bilinear2d(size, align)
            }
            .unwrap();
            let want: Vec<f64> = r
                .data
                .chunks(h * w)
                .flat_map(|plane| interpolate(plane, h, w, size[0], size[1], mode, align))
                .collect();
            assert_close(
                &format!("{mode} align_corners {align} to {size:?}"),
                &got,
                &Nd::new(&[n, c, size[0], size[1]], want),
                1e-6,
                1e-5,
            );
        }
    }
    assert!(x.upsample_nearest2d([0, 2]).is_err());
    assert!(Tensor::ones(&[4, 5], &dev())
        .unwrap()
        .upsample_bilinear2d([8, 10], false)
        .is_err());
    check(
        "bilinear",
        vec![smooth(&mut rng, &[1, 2, 3, 4], -1.0, 1.0)],
        &|t| t[0].upsample_bilinear2d([5, 7], false),
    );
    check(
        "nearest",
        vec![smooth(&mut rng, &[2, 3, 2], -1.0, 1.0)],
        &|t| t[0].upsample_nearest2d([5, 3]),
    );
}

#[test]
fn operators_on_references() {
    let mut rng = Rng::new(8);
    let (a, ra) = rand_pair(&mut rng, &[3, 4], 0.5, 2.0);
    let (b, rb) = rand_pair(&mut rng, &[4], 0.5, 2.0);
    let y = (((&a + &b).unwrap() * &a).unwrap() - (&b / &a).unwrap()).unwrap();
    let want = ra.zip(&rb, |x, y| (x + y) * x - y / x);
    assert_close("(a + b) * a - b / a", &y, &want, 1e-6, 1e-5);
    let y = ((-(&a * 2.0).unwrap()).unwrap() + 1.0).unwrap();
    assert_close("-(a * 2) + 1", &y, &ra.map(|x| 1.0 - 2.0 * x), 1e-6, 1e-6);
    let z = ((&a / 4.0).unwrap() - 1.0).unwrap();
    assert_close("a / 4 - 1", &z, &ra.map(|x| x / 4.0 - 1.0), 1e-6, 1e-6);
    assert!(
        (&a + &Tensor::ones(&[5], &dev()).unwrap()).is_err(),
        "shapes that do not broadcast"
    );
}

#[test]
fn topk_matches_f64() {
    let mut rng = Rng::new(9);
    // Few distinct values, so ties happen: the first index of a tie comes first.
    let v: Vec<f32> = (0..3 * 11).map(|_| rng.below(6) as f32 - 2.0).collect();
    let x = Tensor::from_slice(&v, &[3, 11], &dev()).unwrap();
    for (k, largest) in [(1, true), (4, true), (11, true), (3, false)] {
        let (values, indices) = x.topk(k, 1, largest).unwrap();
        assert_eq!(values.dims(), &[3, k]);
        let (got_v, got_i) = (values.to_vec().unwrap(), indices.to_vec().unwrap());
        for r in 0..3 {
            let mut order: Vec<usize> = (0..11).collect();
            // A stable sort: ties keep index order.
            order.sort_by(|&a, &b| {
                let (x, y) = (v[r * 11 + a], v[r * 11 + b]);
                if largest {
                    y.total_cmp(&x)
                } else {
                    x.total_cmp(&y)
                }
            });
            for j in 0..k {
                assert_eq!(
                    got_i[r * k + j],
                    order[j] as f32,
                    "row {r} rank {j}, k {k}, largest {largest}"
                );
                assert_eq!(got_v[r * k + j], v[r * 11 + order[j]]);
            }
        }
    }
    // Along axis 0, with -inf present: every index appears once.
    let t = Tensor::from_slice(
        &[f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, 2.0],
        &[4, 1],
        &dev(),
    )
    .unwrap();
    let (vals, idx) = t.topk(4, 0, true).unwrap();
    assert_eq!(idx.to_vec().unwrap(), vec![3.0, 1.0, 0.0, 2.0]);
    assert_eq!(vals.to_vec().unwrap()[..2], [2.0, 1.0]);
    assert!(t.topk(5, 0, true).is_err() && t.topk(0, 0, true).is_err());
    check("topk", vec![spaced(&mut rng, &[2, 6])], &|t| {
        Ok(t[0].topk(3, 1, true)?.0)
    });
}
