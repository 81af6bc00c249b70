//! Reductions and softmax against an f64 CPU reference.

mod common;

use common::*;
use kiln::Tensor;

fn sum(v: &[f64]) -> f64 {
    v.iter().sum()
}
fn mean(v: &[f64]) -> f64 {
    sum(v) / v.len() as f64
}
fn var(v: &[f64], correction: f64) -> f64 {
    if v.len() as f64 <= correction {
        return f64::NAN;
    }
    let m = mean(v);
    v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() as f64 - correction)
}
fn first_arg(v: &[f64], better: fn(f64, f64) -> bool) -> f64 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if better(x, v[best]) {
            best = i;
        }
    }
    best as f64
}

fn squeeze(nd: Nd, axes: &[usize], keepdim: bool) -> Nd {
    if keepdim {
        return nd;
    }
    let shape: Vec<usize> = nd
        .shape
        .iter()
        .enumerate()
        .filter(|(i, _)| !axes.contains(i))
        .map(|(_, &d)| d)
        .collect();
    Nd::new(&shape, nd.data)
}

/// Sum/mean: rtol 1e-5 (f32 accumulation over at most a few thousand terms of one sign scale);
/// max/min/argmax/argmin: exact; variance: rtol 1e-4 (two-pass, f32).
#[test]
fn reductions_over_axes() {
    let mut rng = Rng::new(42);
    let cases: &[(&[usize], &[isize])] = &[
        (&[1031], &[0]),
        (&[1031], &[]),
        (&[7, 13], &[0]),
        (&[7, 13], &[1]),
        (&[7, 13], &[-1, 0]),
        (&[3, 5, 7], &[1]),
        (&[3, 5, 7], &[0, 2]),
        (&[3, 5, 7], &[1, 2]),
        (&[2, 1, 4, 3], &[1, 3]),
        (&[65, 3], &[0]),
        (&[1, 1], &[]),
        (&[4, 0, 3], &[1]),
        (&[4, 0, 3], &[0]),
    ];
    for &(shape, axes) in cases {
        let (t, r) = rand_pair(&mut rng, shape, -3.0, 3.0);
        let norm: Vec<usize> = if axes.is_empty() {
            (0..shape.len()).collect()
        } else {
            let mut a: Vec<usize> = axes
                .iter()
                .map(|&a| {
                    if a < 0 {
                        (a + shape.len() as isize) as usize
                    } else {
                        a as usize
                    }
                })
                .collect();
            a.sort();
            a
        };
        let has_elements = norm.iter().all(|&a| shape[a] > 0);
        for keepdim in [false, true] {
            let what = |op: &str| format!("{op} {shape:?} axes {axes:?} keepdim {keepdim}");
            let want = squeeze(r.reduce(&norm, sum), &norm, keepdim);
            assert_close(
                &what("sum"),
                &t.sum(axes, keepdim).unwrap(),
                &want,
                1e-5,
                1e-5,
            );
            let want = squeeze(r.reduce(&norm, mean), &norm, keepdim);
            assert_close(
                &what("mean"),
                &t.mean(axes, keepdim).unwrap(),
                &want,
                1e-5,
                1e-5,
            );
            let want = squeeze(r.reduce(&norm, |v| var(v, 1.0)), &norm, keepdim);
            assert_close(
                &what("var"),
                &t.var(axes, keepdim, 1).unwrap(),
                &want,
                1e-5,
                1e-4,
            );
            let want = squeeze(r.reduce(&norm, |v| var(v, 0.0)), &norm, keepdim);
            assert_close(
                &what("var0"),
                &t.var(axes, keepdim, 0).unwrap(),
                &want,
                1e-5,
                1e-4,
            );
            let output_empty = r.reduce(&norm, |v| v.len() as f64).data.is_empty();
            if has_elements || output_empty {
                let want = squeeze(
                    r.reduce(&norm, |v| v.iter().cloned().fold(f64::MIN, f64::max)),
                    &norm,
                    keepdim,
                );
                assert_close(
                    &what("max"),
                    &t.max(axes, keepdim).unwrap(),
                    &want,
                    0.0,
                    0.0,
                );
                let want = squeeze(
                    r.reduce(&norm, |v| v.iter().cloned().fold(f64::MAX, f64::min)),
                    &norm,
                    keepdim,
                );
                assert_close(
                    &what("min"),
                    &t.min(axes, keepdim).unwrap(),
                    &want,
                    0.0,
                    0.0,
                );
            } else {
                assert!(t.max(axes, keepdim).is_err(), "{}", what("max of empty"));
            }
        }
    }
}

#[test]
fn reductions_of_views() {
    let mut rng = Rng::new(7);
    let (t, r) = rand_pair(&mut rng, &[6, 5, 4], -2.0, 2.0);
    // Permuted: reduced axes no longer chain in memory, so a copy is made first.
    let p = t.permute(&[2, 0, 1]).unwrap();
    let rp = r.permute(&[2, 0, 1]);
    assert_close(
        "sum permuted",
        &p.sum(&[0, 2], false).unwrap(),
        &squeeze(rp.reduce(&[0, 2], sum), &[0, 2], false),
        1e-5,
        1e-5,
    );
    // Narrowed and broadcast.
    let n = t.narrow(0, 1, 3).unwrap();
    let rn = Nd::new(&[3, 5, 4], r.data[20..80].to_vec());
    assert_close(
        "mean narrowed",
        &n.mean(&[1], true).unwrap(),
        &rn.reduce(&[1], mean),
        1e-5,
        1e-5,
    );
    let (b, rb) = rand_pair(&mut rng, &[3, 1], -2.0, 2.0);
    let e = b.expand(&[3, 9]).unwrap();
    let re = rb.zip(&Nd::new(&[3, 9], vec![0.0; 27]), |a, _| a);
    assert_close(
        "sum broadcast",
        &e.sum(&[1], false).unwrap(),
        &squeeze(re.reduce(&[1], sum), &[1], false),
        1e-5,
        1e-5,
    );
}

#[test]
fn argmax_argmin_first_index_on_ties() {
    let mut rng = Rng::new(9);
    // Coarse values so that ties are common.
    let v: Vec<f32> = (0..7 * 33).map(|_| rng.below(4) as f32).collect();
    let t = Tensor::from_slice(&v, &[7, 33], &dev()).unwrap();
    let r = Nd::from_f32(&[7, 33], &v);
    for axis in [0usize, 1] {
        let got = t.argmax(axis as isize, false).unwrap();
        let want = squeeze(
            r.reduce(&[axis], |v| first_arg(v, |x, b| x > b)),
            &[axis],
            false,
        );
        assert_close(&format!("argmax axis {axis}"), &got, &want, 0.0, 0.0);
        let got = t.argmin(axis as isize, true).unwrap();
        let want = r.reduce(&[axis], |v| first_arg(v, |x, b| x < b));
        assert_close(&format!("argmin axis {axis}"), &got, &want, 0.0, 0.0);
    }
    // NaN counts as the maximum, as in PyTorch.
    let t = Tensor::from_slice(&[1.0, f32::NAN, 3.0], &[3], &dev()).unwrap();
    assert_eq!(t.argmax(0, false).unwrap().to_scalar().unwrap(), 1.0);
    assert!(t.max(&[], false).unwrap().to_scalar().unwrap().is_nan());
}

#[test]
fn softmax_and_log_softmax() {
    let mut rng = Rng::new(21);
    for (shape, axis) in [
        (&[5usize, 37][..], 1isize),
        (&[5, 37], 0),
        (&[3, 4, 70], -1),
        (&[2, 3, 4], 1),
        (&[1], 0),
        (&[4, 1], -1),
    ] {
        let (t, r) = rand_pair(&mut rng, shape, -8.0, 8.0);
        let ax = if axis < 0 {
            (axis + shape.len() as isize) as usize
        } else {
            axis as usize
        };
        let m = r.reduce(&[ax], |v| v.iter().cloned().fold(f64::MIN, f64::max));
        let lse = r
            .zip(&m, |x, m| (x - m).exp())
            .reduce(&[ax], sum)
            .map(f64::ln)
            .zip(&m, |l, m| l + m);
        let want_log = r.zip(&lse, |x, l| x - l);
        assert_close(
            &format!("log_softmax {shape:?} {axis}"),
            &t.log_softmax(axis).unwrap(),
            &want_log,
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("softmax {shape:?} {axis}"),
            &t.softmax(axis).unwrap(),
            &want_log.map(f64::exp),
            1e-6,
            1e-5,
        );
        // Transposed input.
        if shape.len() == 2 {
            let tt = t.t().unwrap();
            let rt = r.permute(&[1, 0]);
            let m = rt.reduce(&[1], |v| v.iter().cloned().fold(f64::MIN, f64::max));
            let lse = rt
                .zip(&m, |x, m| (x - m).exp())
                .reduce(&[1], sum)
                .map(f64::ln)
                .zip(&m, |l, m| l + m);
            assert_close(
                "softmax transposed",
                &tt.softmax(-1).unwrap(),
                &rt.zip(&lse, |x, l| (x - l).exp()),
                1e-6,
                1e-5,
            );
        }
    }
    // Stable for huge logits.
    let t = Tensor::from_slice(&[1000.0, 0.0, -1000.0, 1e30], &[1, 4], &dev()).unwrap();
    let s = t.softmax(-1).unwrap().to_vec().unwrap();
    assert_eq!(s, vec![0.0, 0.0, 0.0, 1.0]);
    let l = t.log_softmax(-1).unwrap().to_vec().unwrap();
    assert!(l.iter().all(|v| v.is_finite()) && l[3] == 0.0);
}

#[test]
fn bad_axes_are_err() {
    let t = Tensor::zeros(&[2, 3], &dev()).unwrap();
    let e = t.sum(&[2], false).unwrap_err().to_string();
    assert!(e.contains("sum") && e.contains("axis 2"), "{e}");
    assert!(t.mean(&[-3], false).is_err());
    assert!(t.sum(&[0, 0], false).is_err());
    assert!(t.argmax(5, false).is_err());
    assert!(t.softmax(2).is_err());
    assert!(Tensor::zeros(&[0], &dev())
        .unwrap()
        .argmax(0, false)
        .is_err());
}

/// Both row kernels (one invocation per row, and a workgroup per row with a tree) on every
/// op, rows along and across memory, short and long (300) rows, with ties: the device picks
/// one of them by its type, so each is forced here on a device of its own.
#[test]
fn both_row_kernels() {
    let d = own_device();
    let mut rng = Rng::new(31);
    let cases: &[(&[usize], usize)] =
        &[(&[7, 13], 0), (&[7, 13], 1), (&[3, 300], 1), (&[300, 5], 0)];
    for serial in [true, false] {
        d.force_row_reduction(Some(serial));
        for &(shape, axis) in cases {
            // Values on a coarse grid, so that max/min ties happen.
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    (rng.below(9) as f32 - 4.0) * 0.5
                        + rng.uniform(0.0, 0.01) * (rng.below(2) as f32)
                })
                .collect();
            let t = Tensor::from_slice(&v, shape, &d).unwrap();
            let r = Nd::from_f32(shape, &v);
            let a = axis as isize;
            let what = |op: &str| format!("{op} of {shape:?} along {axis}, serial {serial}");
            let want = |f: &dyn Fn(&[f64]) -> f64| squeeze(r.reduce(&[axis], f), &[axis], false);
            assert_close(
                &what("sum"),
                &t.sum(&[a], false).unwrap(),
                &want(&sum),
                1e-5,
                1e-5,
            );
            assert_close(
                &what("mean"),
                &t.mean(&[a], false).unwrap(),
                &want(&mean),
                1e-5,
                1e-5,
            );
            let max = |v: &[f64]| v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
            assert_close(
                &what("max"),
                &t.max(&[a], false).unwrap(),
                &want(&max),
                0.0,
                0.0,
            );
            assert_close(
                &what("min"),
                &t.min(&[a], false).unwrap(),
                &want(&min),
                0.0,
                0.0,
            );
            let argmax = |v: &[f64]| first_arg(v, |x, b| x > b);
            let argmin = |v: &[f64]| first_arg(v, |x, b| x < b);
            assert_close(
                &what("argmax"),
                &t.argmax(a, false).unwrap(),
                &want(&argmax),
                0.0,
                0.0,
            );
            assert_close(
                &what("argmin"),
                &t.argmin(a, false).unwrap(),
                &want(&argmin),
                0.0,
                0.0,
            );
            for c in [0usize, 1] {
                let var_c = |v: &[f64]| var(v, c as f64);
                assert_close(
                    &what("var"),
                    &t.var(&[a], false, c).unwrap(),
                    &want(&var_c),
                    1e-5,
                    1e-4,
                );
            }
        }
    }
}

/// Rows of 8,192 elements or more (few of them) are reduced in two stages: chunk partials, then
/// the partials and the tail. Sum, mean, max and min of such rows, contiguous and strided,
/// with both row kernels (one invocation per row, a workgroup per row), against f64. The
/// dispatch count shows that the two-stage path ran.
#[test]
fn long_rows_take_the_two_stage_path() {
    let d = own_device();
    let mut rng = Rng::new(8192);
    let cases: &[(&[usize], &[isize])] =
        &[(&[3, 9001], &[1]), (&[9001, 2], &[0]), (&[100_003], &[])];
    for serial in [true, false] {
        d.force_row_reduction(Some(serial));
        for &(shape, axes) in cases {
            let v = rng.vec(shape.iter().product(), -3.0, 3.0);
            let t = Tensor::from_slice(&v, shape, &d).unwrap();
            let r = Nd::from_f32(shape, &v);
            let norm: Vec<usize> = if axes.is_empty() {
                (0..shape.len()).collect()
            } else {
                axes.iter()
                    .map(|&a| (a + shape.len() as isize) as usize % shape.len())
                    .collect()
            };
            let what = |op: &str| format!("{op} {shape:?} axes {axes:?} serial {serial}");
            type Op = (
                &'static str,
                fn(&Tensor, &[isize]) -> kiln::Result<Tensor>,
                fn(&[f64]) -> f64,
                f64,
            );
            let ops: &[Op] = &[
                ("sum", |t, a| t.sum(a, false), sum, 1e-3),
                ("mean", |t, a| t.mean(a, false), mean, 1e-6),
                (
                    "max",
                    |t, a| t.max(a, false),
                    |v| v.iter().cloned().fold(f64::MIN, f64::max),
                    0.0,
                ),
                (
                    "min",
                    |t, a| t.min(a, false),
                    |v| v.iter().cloned().fold(f64::MAX, f64::min),
                    0.0,
                ),
            ];
            for &(name, f, reference, atol) in ops {
                let before = d.stats().dispatches;
                let got = f(&t, axes).unwrap();
                d.synchronize().unwrap();
                assert!(
                    d.stats().dispatches - before >= 3,
                    "{}: one dispatch, not the two-stage path",
                    what(name)
                );
                let want = squeeze(r.reduce(&norm, reference), &norm, false);
                assert_close(&what(name), &got, &want, atol, 1e-5);
            }
        }
    }
    d.force_row_reduction(None);
}
