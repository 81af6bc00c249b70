//! Finite-difference checks of convolution, pooling, normalisation and dropout (see
//! tests/grad_fd.rs for the step and tolerance), plus invalid configurations and dropout's
//! statistics.

mod common;

use common::*;
use kiln::kernels::Kernel;
use kiln::{Conv2dOptions, ConvTranspose2dOptions, Error, Pool2dOptions, Tensor};

#[test]
fn convolutions() {
    let mut r = Rng::new(10);
    let opts = Conv2dOptions {
        stride: [2, 1],
        padding: [1, 2],
        dilation: [1, 2],
        groups: 2,
    };
    check(
        "conv2d grouped strided dilated",
        vec![
            smooth(&mut r, &[2, 4, 5, 4], -1.0, 1.0),
            smooth(&mut r, &[4, 2, 3, 2], -1.0, 1.0),
            smooth(&mut r, &[4], -1.0, 1.0),
        ],
        &move |x| x[0].conv2d(&x[1], Some(&x[2]), &opts),
    );
    let depthwise = Conv2dOptions {
        padding: [1, 1],
        groups: 3,
        ..Default::default()
    };
    check(
        "conv2d depthwise",
        vec![
            smooth(&mut r, &[1, 3, 4, 4], -1.0, 1.0),
            smooth(&mut r, &[3, 1, 3, 3], -1.0, 1.0),
        ],
        &move |x| x[0].conv2d(&x[1], None, &depthwise),
    );
    check(
        "conv1d",
        vec![
            smooth(&mut r, &[2, 2, 7], -1.0, 1.0),
            smooth(&mut r, &[3, 2, 3], -1.0, 1.0),
            smooth(&mut r, &[3], -1.0, 1.0),
        ],
        &|x| x[0].conv1d(&x[1], Some(&x[2]), 2, 1, 1, 1),
    );
    let t = ConvTranspose2dOptions {
        stride: [2, 2],
        padding: [1, 0],
        output_padding: [1, 1],
        dilation: [1, 1],
        groups: 2,
    };
    check(
        "conv_transpose2d",
        vec![
            smooth(&mut r, &[1, 4, 3, 3], -1.0, 1.0),
            smooth(&mut r, &[4, 1, 3, 2], -1.0, 1.0),
            smooth(&mut r, &[2], -1.0, 1.0),
        ],
        &move |x| x[0].conv_transpose2d(&x[1], Some(&x[2]), &t),
    );
}

#[test]
fn pooling() {
    let mut r = Rng::new(11);
    let mut o = Pool2dOptions::new([3, 2]);
    o.stride = [2, 1];
    o.padding = [1, 1];
    check(
        "max_pool2d overlapping",
        vec![spaced(&mut r, &[1, 2, 5, 4])],
        &move |x| x[0].max_pool2d(&o),
    );
    let mut d = Pool2dOptions::new([2, 2]);
    d.stride = [1, 1];
    d.dilation = [2, 1];
    check(
        "max_pool2d dilated",
        vec![spaced(&mut r, &[1, 1, 5, 4])],
        &move |x| x[0].max_pool2d(&d),
    );
    let mut a = Pool2dOptions::new([3, 3]);
    a.stride = [2, 2];
    a.padding = [1, 1];
    check(
        "avg_pool2d",
        vec![smooth(&mut r, &[2, 1, 5, 5], -1.0, 1.0)],
        &move |x| x[0].avg_pool2d(&a),
    );
    a.count_include_pad = false;
    check(
        "avg_pool2d valid only",
        vec![smooth(&mut r, &[1, 2, 4, 5], -1.0, 1.0)],
        &move |x| x[0].avg_pool2d(&a),
    );
    check(
        "adaptive_avg_pool2d",
        vec![smooth(&mut r, &[1, 2, 5, 7], -1.0, 1.0)],
        &|x| x[0].adaptive_avg_pool2d([2, 3]),
    );
    check(
        "global_avg_pool",
        vec![smooth(&mut r, &[2, 2, 3, 3], -1.0, 1.0)],
        &|x| x[0].adaptive_avg_pool2d([1, 1]),
    );
}

#[test]
fn normalisation_and_dropout() {
    let mut r = Rng::new(12);
    check(
        "batch_norm training",
        vec![
            smooth(&mut r, &[3, 2, 2, 2], -1.0, 1.0),
            smooth(&mut r, &[2], 0.5, 1.5),
            smooth(&mut r, &[2], -0.5, 0.5),
        ],
        &|x| x[0].batch_norm(None, None, Some(&x[1]), Some(&x[2]), true, 0.1, 1e-5),
    );
    let (rm, rv) = (
        constant(&[2], vec![0.1, -0.2]),
        constant(&[2], vec![0.8, 1.3]),
    );
    check(
        "batch_norm eval",
        vec![
            smooth(&mut r, &[3, 2, 2], -1.0, 1.0),
            smooth(&mut r, &[2], 0.5, 1.5),
            smooth(&mut r, &[2], -0.5, 0.5),
            rm,
            rv,
        ],
        &|x| {
            x[0].batch_norm(
                Some(&x[3]),
                Some(&x[4]),
                Some(&x[1]),
                Some(&x[2]),
                false,
                0.1,
                1e-5,
            )
        },
    );
    check(
        "layer_norm",
        vec![
            smooth(&mut r, &[2, 3, 2], -1.0, 1.0),
            smooth(&mut r, &[3, 2], 0.5, 1.5),
            smooth(&mut r, &[3, 2], -0.5, 0.5),
        ],
        &|x| x[0].layer_norm(&[3, 2], Some(&x[1]), Some(&x[2]), 1e-5),
    );
    check(
        "group_norm",
        vec![
            smooth(&mut r, &[2, 4, 3], -1.0, 1.0),
            smooth(&mut r, &[4], 0.5, 1.5),
            smooth(&mut r, &[4], -0.5, 0.5),
        ],
        &|x| x[0].group_norm(2, Some(&x[1]), Some(&x[2]), 1e-5),
    );
    check("dropout", vec![smooth(&mut r, &[3, 5], -1.0, 1.0)], &|x| {
        x[0].dropout(0.4, 99, true)
    });
}

#[test]
fn dropout_masks_are_seeded_scaled_and_reused_by_backward() {
    let d = dev();
    let n = 20000;
    let x = Tensor::ones(&[n], &d).unwrap().requires_grad();
    let y = x.dropout(0.25, 5, true).unwrap();
    let v = y.to_vec().unwrap();
    assert_eq!(
        v,
        x.dropout(0.25, 5, true).unwrap().to_vec().unwrap(),
        "same seed, same mask"
    );
    assert_ne!(v, x.dropout(0.25, 6, true).unwrap().to_vec().unwrap());
    let scale = 1.0 / 0.75;
    assert!(v.iter().all(|&e| e == 0.0 || (e - scale).abs() < 1e-6));
    let dropped = v.iter().filter(|&&e| e == 0.0).count() as f64 / n as f64;
    assert!((dropped - 0.25).abs() < 0.015, "dropped fraction {dropped}");
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        x.grad().unwrap().to_vec().unwrap(),
        v,
        "the gradient is scaled by the same mask"
    );
    assert_eq!(
        x.dropout(0.25, 5, false).unwrap().to_vec().unwrap(),
        vec![1.0; n],
        "identity in eval"
    );
    assert_eq!(
        x.dropout(1.0, 5, true).unwrap().to_vec().unwrap(),
        vec![0.0; n]
    );
    assert!(x.dropout(1.5, 5, true).is_err());
}

fn err_text(r: kiln::Result<Tensor>) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(t) => panic!("expected an error, got {t:?}"),
    }
}

#[test]
fn invalid_configurations_are_err() {
    let d = dev();
    let x = Tensor::zeros(&[1, 4, 5, 5], &d).unwrap();
    let w = Tensor::zeros(&[6, 4, 7, 7], &d).unwrap();
    let e = err_text(x.conv2d(&w, None, &Default::default()));
    assert!(
        e.contains("conv2d") && e.contains("larger than the padded input") && e.contains("[7, 7]"),
        "{e}"
    );
    // The kernel hooks take their own pass's kernels only.
    use kiln::kernels::Kernel;
    let w1 = Tensor::zeros(&[6, 4, 3, 3], &d).unwrap();
    let opts = Conv2dOptions::default();
    let e = err_text(x.conv2d_forward_with(&w1, &opts, Kernel::Conv2dBwdInput));
    assert!(
        e.contains("Conv2dBwdInput is not a conv2d forward kernel"),
        "{e}"
    );
    let dy = Tensor::zeros(&[1, 6, 3, 3], &d).unwrap();
    let e = err_text(dy.conv2d_input_grad_with(&w1, x.dims(), &opts, Kernel::Conv2dFwd));
    assert!(
        e.contains("Conv2dFwd is not a conv2d input-gradient kernel"),
        "{e}"
    );
    let e = err_text(dy.conv2d_weight_grad_with(&x, w1.dims(), &opts, Kernel::MatmulFwd, None));
    assert!(
        e.contains("MatmulFwd is not a conv2d weight-gradient kernel"),
        "{e}"
    );
    let m = Tensor::zeros(&[4, 4], &d).unwrap();
    let e = err_text(m.matmul_with_kernel(&m, Kernel::Conv2dFwd));
    assert!(e.contains("Conv2dFwd is not a matmul kernel"), "{e}");
    let w3 = Tensor::zeros(&[6, 2, 3, 3], &d).unwrap();
    let e = err_text(x.conv2d(
        &w3,
        None,
        &Conv2dOptions {
            groups: 3,
            ..Default::default()
        },
    ));
    assert!(
        e.contains("divisible by groups") && e.contains("3 groups"),
        "{e}"
    );
    let e = err_text(x.conv2d(
        &Tensor::zeros(&[6, 4, 3, 3], &d).unwrap(),
        None,
        &Conv2dOptions {
            stride: [0, 1],
            ..Default::default()
        },
    ));
    assert!(e.contains("stride") && e.contains("[0, 1]"), "{e}");
    let e = err_text(
        Tensor::zeros(&[4, 5], &d)
            .unwrap()
            .conv2d(&w3, None, &Default::default()),
    );
    assert!(e.contains("rank 4") && e.contains("[4, 5]"), "{e}");
    assert!(
        x.conv2d(
            &Tensor::zeros(&[6, 3, 3, 3], &d).unwrap(),
            None,
            &Default::default()
        )
        .is_err(),
        "channel mismatch"
    );
    let bad_bias = Tensor::zeros(&[5], &d).unwrap();
    assert!(x
        .conv2d(
            &Tensor::zeros(&[6, 4, 3, 3], &d).unwrap(),
            Some(&bad_bias),
            &Default::default()
        )
        .is_err());
    assert!(matches!(
        x.max_pool2d(&Pool2dOptions::new([7, 7])),
        Err(Error::Shape { .. })
    ));
    let mut o = Pool2dOptions::new([2, 2]);
    o.padding = [2, 2];
    assert!(x.max_pool2d(&o).is_err(), "padding above half the kernel");
    o = Pool2dOptions::new([2, 2]);
    o.stride = [0, 2];
    assert!(x.avg_pool2d(&o).is_err());
    assert!(Tensor::zeros(&[5, 5], &d)
        .unwrap()
        .max_pool2d(&Pool2dOptions::new([2, 2]))
        .is_err());
    let t = ConvTranspose2dOptions {
        output_padding: [2, 2],
        stride: [2, 2],
        ..Default::default()
    };
    assert!(x
        .conv_transpose2d(&Tensor::zeros(&[4, 2, 3, 3], &d).unwrap(), None, &t)
        .is_err());
    assert!(x.group_norm(3, None, None, 1e-5).is_err());
    assert!(x.layer_norm(&[4], None, None, 1e-5).is_err());
    assert!(
        x.batch_norm(None, None, None, None, false, 0.1, 1e-5)
            .is_err(),
        "eval needs running statistics"
    );
    let single = Tensor::zeros(&[1, 4], &d).unwrap();
    assert!(
        single
            .batch_norm(None, None, None, None, true, 0.1, 1e-5)
            .is_err(),
        "one value per channel"
    );
}

#[test]
fn unbatched_inputs_and_shapes() {
    let d = dev();
    let x = Tensor::randn(&[3, 8, 8], 1, &d).unwrap();
    let w = Tensor::randn(&[5, 3, 3, 3], 2, &d).unwrap();
    assert_eq!(
        x.conv2d(&w, None, &Default::default()).unwrap().dims(),
        &[5, 6, 6]
    );
    assert_eq!(
        x.max_pool2d(&Pool2dOptions::new([2, 2])).unwrap().dims(),
        &[3, 4, 4]
    );
    // A conv with unit weights equals a box sum.
    let ones = Tensor::ones(&[1, 1, 3, 3], &d).unwrap();
    let img = Tensor::ones(&[1, 1, 4, 4], &d).unwrap();
    let pad = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    assert_eq!(
        img.conv2d(&ones, None, &pad).unwrap().to_vec().unwrap(),
        vec![4.0, 6.0, 6.0, 4.0, 6.0, 9.0, 9.0, 6.0, 6.0, 9.0, 9.0, 6.0, 4.0, 6.0, 6.0, 4.0]
    );
}

/// The weight gradient sums over every output position; long sums are split across
/// workgroups and the partial sums added. Checked against an f64 reference on a layer with
/// 6,400 output positions.
#[test]
fn weight_gradient_with_split_reduction() {
    let d = dev();
    let mut rng = Rng::new(77);
    let (n, c, o, s) = (4usize, 2usize, 3usize, 40usize);
    let xv = rng.vec(n * c * s * s, -1.0, 1.0);
    let wv = rng.vec(o * c * 9, -1.0, 1.0);
    let gv = rng.vec(n * o * s * s, -1.0, 1.0);
    let x = Tensor::from_slice(&xv, &[n, c, s, s], &d).unwrap();
    let w = Tensor::from_slice(&wv, &[o, c, 3, 3], &d)
        .unwrap()
        .requires_grad();
    let pad = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    let y = x.conv2d(&w, None, &pad).unwrap();
    y.backward_with(
        Some(&Tensor::from_slice(&gv, &[n, o, s, s], &d).unwrap()),
        false,
    )
    .unwrap();
    let mut want = vec![0f64; o * c * 9];
    for b in 0..n {
        for co in 0..o {
            for oy in 0..s {
                for ox in 0..s {
                    let g = gv[((b * o + co) * s + oy) * s + ox] as f64;
                    for ci in 0..c {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) =
                                    (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
                                if iy >= 0 && ix >= 0 && (iy as usize) < s && (ix as usize) < s {
                                    let xi = xv[((b * c + ci) * s + iy as usize) * s + ix as usize]
                                        as f64;
                                    want[((co * c + ci) * 3 + ky) * 3 + kx] += g * xi;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let want = Nd::new(&[o, c, 3, 3], want);
    assert_close(
        "split weight gradient",
        &w.grad().unwrap(),
        &want,
        1e-3,
        1e-4,
    );
    // Both kernels, whichever the device would pick.
    let dy = Tensor::from_slice(&gv, &[n, o, s, s], &d).unwrap();
    for kernel in [
        Kernel::Conv2dBwdWeight,
        Kernel::Conv2dSgBwdWeight,
        Kernel::Conv2dBwdWeightTiled,
    ] {
        // The subgroup kernel needs subgroups of 8 or more; elsewhere it is refused.
        if kernel == Kernel::Conv2dSgBwdWeight && !d.subgroups_of_at_least(8) {
            assert!(dy
                .conv2d_weight_grad_with(&x, &[o, c, 3, 3], &pad, kernel, None)
                .is_err());
            continue;
        }
        for splits in [1, 7] {
            let got = dy
                .conv2d_weight_grad_with(&x, &[o, c, 3, 3], &pad, kernel, Some(splits))
                .unwrap();
            assert_close(
                &format!("weight gradient, {kernel:?}, {splits} splits"),
                &got,
                &want,
                1e-3,
                1e-4,
            );
        }
    }
    // A grouped, strided, dilated case through the tiled kernel.
    let (gx, gw) = (
        Tensor::randn(&[2, 4, 33, 35], 3, &d).unwrap(),
        [6usize, 2, 3, 2],
    );
    let o2 = Conv2dOptions {
        stride: [2, 1],
        padding: [1, 2],
        dilation: [1, 2],
        groups: 2,
    };
    let y = gx
        .conv2d(&Tensor::zeros(&gw, &d).unwrap(), None, &o2)
        .unwrap();
    let gdy = Tensor::randn(y.dims(), 4, &d).unwrap();
    let (_, _, want, _) = conv_reference(
        &gx.to_vec().unwrap(),
        [2, 4, 33, 35],
        &vec![0.0; gw.iter().product()],
        gw,
        &o2,
        &gdy.to_vec().unwrap(),
    );
    for (kernel, splits) in [
        (Kernel::Conv2dBwdWeight, 1),
        (Kernel::Conv2dBwdWeightTiled, 5),
    ] {
        let got = gdy
            .conv2d_weight_grad_with(&gx, &gw, &o2, kernel, Some(splits))
            .unwrap()
            .to_vec()
            .unwrap();
        assert_close_slice(
            &format!("grouped weight gradient, {kernel:?}, {splits} splits"),
            &got,
            &want,
            1e-3,
            1e-4,
        );
    }
}

/// f64 reference of conv2d (NCHW, grouped): returns y and, for `dy`, the input and weight
/// gradients.
fn conv_reference(
    x: &[f32],
    [n, c, h, w]: [usize; 4],
    wt: &[f32],
    [o, cg, kh, kw]: [usize; 4],
    opts: &Conv2dOptions,
    dy: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, [usize; 2]) {
    let [sh, sw] = opts.stride;
    let [ph, pw] = opts.padding;
    let [dh, dw] = opts.dilation;
    let oh = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
    let ow = (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
    let og = o / opts.groups;
    let mut y = vec![0.0; n * o * oh * ow];
    let mut dx = vec![0.0; n * c * h * w];
    let mut dwt = vec![0.0; wt.len()];
    for b in 0..n {
        for co in 0..o {
            let g = co / og;
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((b * o + co) * oh + oy) * ow + ox;
                    for ci in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * sh + ky * dh) as isize - ph as isize;
                                let ix = (ox * sw + kx * dw) as isize - pw as isize;
                                if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                    continue;
                                }
                                let xi =
                                    ((b * c + g * cg + ci) * h + iy as usize) * w + ix as usize;
                                let wi = ((co * cg + ci) * kh + ky) * kw + kx;
                                y[yi] += x[xi] as f64 * wt[wi] as f64;
                                dx[xi] += dy[yi] as f64 * wt[wi] as f64;
                                dwt[wi] += dy[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (y, dx, dwt, [oh, ow])
}

/// The forward and both gradient kernels, register-blocked (with and without subgroups) and
/// shared-memory tiled (a device picks one of them by its type, so each is run here by name),
/// against the f64 reference on odd sizes with strides that do not divide, padding, dilation and groups, and output planes
/// of one and four positions (the weight gradient walks positions across images).
#[test]
fn forward_and_gradient_kernels() {
    let d = dev();
    let mut rng = Rng::new(77);
    let cases = [
        ([2, 4, 9, 11], [6, 2, 3, 2], [2, 1], [1, 2], [1, 2], 2),
        ([3, 5, 7, 6], [7, 5, 3, 3], [1, 1], [1, 1], [1, 1], 1),
        ([1, 3, 10, 8], [3, 1, 3, 3], [3, 2], [2, 0], [1, 1], 3),
        ([5, 3, 1, 1], [4, 3, 1, 1], [1, 1], [0, 0], [1, 1], 1),
        ([6, 2, 2, 2], [3, 2, 3, 3], [1, 1], [1, 1], [1, 1], 1),
    ];
    for (xs, ws, stride, padding, dilation, groups) in cases {
        let opts = Conv2dOptions {
            stride,
            padding,
            dilation,
            groups,
        };
        let xv = rng.vec(xs.iter().product(), -1.0, 1.0);
        let wv = rng.vec(ws.iter().product(), -1.0, 1.0);
        let x = Tensor::from_slice(&xv, &xs, &d).unwrap();
        let w = Tensor::from_slice(&wv, &ws, &d).unwrap();
        let y_dims = x.conv2d(&w, None, &opts).unwrap().dims().to_vec();
        let dyv = rng.vec(y_dims.iter().product(), -1.0, 1.0);
        let dy = Tensor::from_slice(&dyv, &y_dims, &d).unwrap();
        let (y, dx, dw, [oh, ow]) = conv_reference(&xv, xs, &wv, ws, &opts, &dyv);
        assert_eq!(y_dims, vec![xs[0], ws[0], oh, ow]);
        for (fwd, bwd_input, bwd_weight) in [
            (
                Kernel::Conv2dFwd,
                Kernel::Conv2dBwdInput,
                Kernel::Conv2dBwdWeight,
            ),
            (
                Kernel::Conv2dSgFwd,
                Kernel::Conv2dSgBwdInput,
                Kernel::Conv2dSgBwdWeight,
            ),
            (
                Kernel::Conv2dTiledFwd,
                Kernel::Conv2dBwdInputTiled,
                Kernel::Conv2dBwdWeightTiled,
            ),
        ] {
            let what = format!("{xs:?} * {ws:?} s{stride:?} p{padding:?} d{dilation:?}, {fwd:?}");
            // The subgroup kernels need subgroups of 8 or more (lavapipe on AVX2 has 8);
            // elsewhere they are refused.
            if fwd == Kernel::Conv2dSgFwd && !d.subgroups_of_at_least(8) {
                assert!(x.conv2d_forward_with(&w, &opts, fwd).is_err());
                assert!(dy
                    .conv2d_input_grad_with(&w, &xs, &opts, bwd_input)
                    .is_err());
                assert!(dy
                    .conv2d_weight_grad_with(&x, &ws, &opts, bwd_weight, None)
                    .is_err());
                continue;
            }
            let got = x.conv2d_forward_with(&w, &opts, fwd).unwrap();
            assert_close(
                &format!("forward {what}"),
                &got,
                &Nd::new(&y_dims, y.clone()),
                1e-5,
                1e-5,
            );
            let got = dy
                .conv2d_input_grad_with(&w, &xs, &opts, bwd_input)
                .unwrap();
            assert_close(
                &format!("input gradient {what}"),
                &got,
                &Nd::new(&xs, dx.clone()),
                1e-5,
                1e-5,
            );
            for splits in [1, 3] {
                let got = dy
                    .conv2d_weight_grad_with(&x, &ws, &opts, bwd_weight, Some(splits))
                    .unwrap();
                assert_close(
                    &format!("weight gradient {what}, {splits} splits"),
                    &got,
                    &Nd::new(&ws, dw.clone()),
                    1e-5,
                    1e-5,
                );
            }
        }
    }
}

/// The hardware path of kernel choice, run on any adapter: with autotuning on, the first
/// convolution of each shape class (forward, input and weight gradient) times its candidate
/// kernels and keeps one; the results match the f64 reference on that run and on the next,
/// which takes the kept choice.
#[test]
fn hardware_choices_tune_the_convolutions() {
    let d = own_device();
    d.choose_as_hardware(true);
    d.set_autotune(true);
    let mut rng = Rng::new(5);
    // GEMMs of 2^21 multiply-adds or more, the autotuner's threshold.
    let (xs, ws) = ([4, 8, 16, 15], [32, 8, 3, 3]);
    let opts = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    let xv = rng.vec(xs.iter().product(), -1.0, 1.0);
    let wv = rng.vec(ws.iter().product(), -1.0, 1.0);
    let dyv = rng.vec(4 * 32 * 16 * 15, -1.0, 1.0);
    let (y, dx, dw, _) = conv_reference(&xv, xs, &wv, ws, &opts, &dyv);
    for run in 0..2 {
        let x = Tensor::from_slice(&xv, &xs, &d).unwrap().requires_grad();
        let w = Tensor::from_slice(&wv, &ws, &d).unwrap().requires_grad();
        let out = x.conv2d(&w, None, &opts).unwrap();
        let dy = Tensor::from_slice(&dyv, out.dims(), &d).unwrap();
        out.backward_with(Some(&dy), false).unwrap();
        let what = format!("run {run}");
        assert_close(
            &format!("forward, {what}"),
            &out,
            &Nd::new(out.dims(), y.clone()),
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("input gradient, {what}"),
            &x.grad().unwrap(),
            &Nd::new(&xs, dx.clone()),
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("weight gradient, {what}"),
            &w.grad().unwrap(),
            &Nd::new(&ws, dw.clone()),
            1e-4,
            1e-5,
        );
    }
    let tuned = d.tuned_kernels();
    for (family, candidates) in [
        (
            Kernel::Conv2dFwd,
            [
                Kernel::Conv2dFwd,
                Kernel::Conv2dSgFwd,
                Kernel::Conv2dTiledFwd,
            ],
        ),
        (
            Kernel::Conv2dBwdInput,
            [
                Kernel::Conv2dBwdInput,
                Kernel::Conv2dSgBwdInput,
                Kernel::Conv2dBwdInputTiled,
            ],
        ),
        (
            Kernel::Conv2dBwdWeight,
            [
                Kernel::Conv2dBwdWeight,
                Kernel::Conv2dSgBwdWeight,
                Kernel::Conv2dBwdWeightTiled,
            ],
        ),
    ] {
        let chosen: Vec<Kernel> = tuned
            .iter()
            .filter(|(f, _, _)| *f == family)
            .map(|&(_, _, k)| k)
            .collect();
        assert_eq!(chosen.len(), 1, "{family:?}: {tuned:?}");
        assert!(candidates.contains(&chosen[0]), "{family:?}: {chosen:?}");
    }
}

/// The im2col-times-weight path that software adapters take for convolutions with 32 or more
/// output channels and planes in multiples of 4 (reduction depths padded to one; the input
/// gradient only for depths that are one; the weight gradient reads the forward's matrix):
/// forward and the three gradients through autograd
/// against the f64 reference, with strides, padding and dilation, with and without a bias
/// (added by the product's epilogue, along its rows).
#[test]
fn im2col_matmul_path_matches_the_reference() {
    let d = own_device();
    let mut rng = Rng::new(91);
    let cases = [
        ([2, 4, 8, 8], [32, 4, 3, 3], [1, 1], [1, 1], [1, 1]),
        ([3, 8, 9, 7], [36, 8, 1, 2], [1, 2], [0, 1], [1, 1]),
        ([2, 4, 12, 10], [40, 4, 3, 3], [2, 2], [2, 2], [2, 1]),
        // Depth 9, padded to 12.
        ([2, 1, 8, 8], [32, 1, 3, 3], [1, 1], [1, 1], [1, 1]),
        // 34 output channels: the input gradient's product runs per sample (its depth, c_out,
        // is not a multiple of 4).
        ([3, 4, 6, 6], [34, 4, 3, 3], [1, 1], [1, 1], [1, 1]),
        ([2, 4, 6, 6], [34, 4, 3, 3], [1, 1], [1, 1], [1, 1]),
        // 5 samples over 2 output tiles: summed in layers of 2, 2 and 1.
        ([5, 1, 6, 6], [32, 1, 3, 3], [1, 1], [1, 1], [1, 1]),
        ([5, 1, 6, 6], [32, 1, 3, 3], [1, 1], [1, 1], [1, 1]),
        // 4 x 2 output tiles of the weight gradient: its samples summed in one layer.
        ([2, 16, 6, 6], [64, 16, 3, 3], [1, 1], [1, 1], [1, 1]),
        ([2, 16, 6, 6], [64, 16, 3, 3], [1, 1], [1, 1], [1, 1]),
    ];
    for (i, (xs, ws, stride, padding, dilation)) in cases.into_iter().enumerate() {
        let opts = Conv2dOptions {
            stride,
            padding,
            dilation,
            groups: 1,
        };
        let xv = rng.vec(xs.iter().product(), -1.0, 1.0);
        let wv = rng.vec(ws.iter().product(), -1.0, 1.0);
        let bv = rng.vec(ws[0], -1.0, 1.0);
        let x = Tensor::from_slice(&xv, &xs, &d).unwrap().requires_grad();
        let w = Tensor::from_slice(&wv, &ws, &d).unwrap().requires_grad();
        let b = Tensor::from_slice(&bv, &[ws[0]], &d)
            .unwrap()
            .requires_grad();
        let with_bias = i % 2 == 0;
        d.set_profiling(true);
        let y = x.conv2d(&w, with_bias.then_some(&b), &opts).unwrap();
        let dyv = rng.vec(y.numel(), -1.0, 1.0);
        let dy = Tensor::from_slice(&dyv, y.dims(), &d).unwrap();
        y.backward_with(Some(&dy), false).unwrap();
        let (mut yr, dx, dw, [oh, ow]) = conv_reference(&xv, xs, &wv, ws, &opts, &dyv);
        let what =
            format!("{xs:?} * {ws:?} s{stride:?} p{padding:?} d{dilation:?} bias {with_bias}");
        if with_bias {
            // y[nn, o, :] += b[o]; db[o] = sum of dy[nn, o, :].
            let plane = oh * ow;
            let mut db = vec![0.0f64; ws[0]];
            for (e, v) in yr.iter_mut().enumerate() {
                let o = e / plane % ws[0];
                *v += bv[o] as f64;
                db[o] += dyv[e] as f64;
            }
            assert_close(
                &format!("db {what}"),
                &b.grad().unwrap(),
                &Nd::new(&[ws[0]], db),
                1e-5,
                1e-5,
            );
        } else {
            assert!(b.grad().is_none(), "{what}");
        }
        assert_eq!((oh * ow) % 4, 0, "{what}: the case must suit the path");
        assert_close(
            &format!("forward {what}"),
            &y,
            &Nd::new(y.dims(), yr),
            1e-5,
            1e-5,
        );
        assert_conv_grads(&what, (&x, dx), (&w, dw), None);
        d.synchronize().unwrap();
        let profile = d.profile();
        let ran: Vec<String> = profile.iter().map(|k| k.kernel.clone()).collect();
        d.set_profiling(false);
        if d.adapter_info().device_type == kiln::wgpu::DeviceType::Cpu {
            let depth = ws[1] * ws[2] * ws[3];
            // Built once: the weight gradient reads the forward's matrix.
            let im2col = profile.iter().find(|k| k.kernel == "conv2d_im2col_fwd");
            assert_eq!(im2col.map(|k| k.calls), Some(1), "{what}: {ran:?}");
            let col2im = ran.iter().any(|r| r == "conv2d_col2im_bwd");
            assert_eq!(col2im, depth % 4 == 0, "{what}: {ran:?}");
            // One product per pass over every sample: the forward, the weight gradient summed
            // over the samples in the kernel, and the input gradient where it runs through
            // col2im. The weight gradient's sum runs in layers, added up after it, where its
            // output has fewer than 8 tiles of 16 x 128; with 8 or more, in one layer (no
            // reduction after it).
            let products: u64 = profile
                .iter()
                .filter(|k| k.kernel.starts_with("matmul"))
                .map(|k| k.calls)
                .sum();
            assert_eq!(products, 2 + col2im as u64, "{what}: {ran:?}");
            let reduced = ran.iter().any(|r| r.starts_with("reduce"));
            let tiles = ws[0].div_ceil(16) * depth.next_multiple_of(4).div_ceil(128);
            if tiles >= 8 {
                assert_eq!(reduced, with_bias, "{what}: {ran:?}");
            }
            // The per-sample fallback of the input gradient takes a general matmul kernel.
            let general = ran.iter().any(|r| r == "matmul_fwd");
            assert_eq!(general, col2im && ws[0] % 4 != 0, "{what}: {ran:?}");
        }
    }
}

/// conv_transpose2d runs conv2d's input gradient, so on software adapters with 32 or more
/// input channels it takes the im2col path's col2im: against the f64 input gradient of the
/// convolution it transposes.
#[test]
fn conv_transpose_through_the_im2col_path() {
    let d = own_device();
    let mut rng = Rng::new(93);
    // The transposed convolution of a conv2d 8 -> 32, k 4, stride 2, padding 1 on 9x9.
    let (xs, ws) = ([2usize, 8, 9, 9], [32usize, 8, 4, 4]);
    let conv = Conv2dOptions {
        stride: [2, 2],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    let wv = rng.vec(ws.iter().product(), -1.0, 1.0);
    let tv = rng.vec(2 * 32 * 4 * 4, -1.0, 1.0);
    let zeros = vec![0.0; xs.iter().product()];
    let (_, want, _, [oh, ow]) = conv_reference(&zeros, xs, &wv, ws, &conv, &tv);
    assert_eq!([oh, ow], [4, 4]);
    let t = Tensor::from_slice(&tv, &[2, 32, 4, 4], &d).unwrap();
    let w = Tensor::from_slice(&wv, &ws, &d).unwrap();
    let opts = ConvTranspose2dOptions {
        stride: [2, 2],
        padding: [1, 1],
        output_padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    d.set_profiling(true);
    let y = t.conv_transpose2d(&w, None, &opts).unwrap();
    assert_close("conv_transpose2d", &y, &Nd::new(&xs, want), 1e-5, 1e-5);
    let ran: Vec<String> = d.profile().into_iter().map(|k| k.kernel).collect();
    d.set_profiling(false);
    if d.adapter_info().device_type == kiln::wgpu::DeviceType::Cpu {
        assert!(ran.iter().any(|k| k == "conv2d_col2im_bwd"), "{ran:?}");
    }
}

/// Max pooling whose windows tile the input: the 2x2 kernels (even widths; odd heights leave
/// a last row that no window covers) and the generic kernels' tiling fast path (odd widths,
/// 3x3), against an f64 reference of the forward and the gradient, with tied maxima (the first
/// in scan order wins) and a NaN (it wins, as in PyTorch).
#[test]
fn max_pool_tiling_windows_on_uncovered_edges() {
    let d = own_device();
    let mut rng = Rng::new(95);
    for (h, w, k) in [
        (5usize, 5usize, 2usize),
        (5, 6, 2),
        (6, 8, 2),
        (3, 2, 2),
        (7, 7, 3),
    ] {
        let (n, c) = (2usize, 3usize);
        let mut xv = rng.vec(n * c * h * w, -1.0, 1.0);
        // Ties in the first window of each plane; a NaN in the last plane's first window.
        for plane in 0..n * c {
            for ky in 0..k {
                for kx in 0..k {
                    xv[(plane * h + ky) * w + kx] = 0.5;
                }
            }
        }
        xv[(n * c - 1) * h * w + w + 1] = f32::NAN;
        let x = Tensor::from_slice(&xv, &[n, c, h, w], &d)
            .unwrap()
            .requires_grad();
        let opts = Pool2dOptions::new([k, k]);
        d.set_profiling(true);
        let y = x.max_pool2d(&opts).unwrap();
        let (oh, ow) = (h / k, w / k);
        let gv = rng.vec(n * c * oh * ow, -1.0, 1.0);
        y.backward_with(Some(&Tensor::from_slice(&gv, y.dims(), &d).unwrap()), false)
            .unwrap();
        d.synchronize().unwrap();
        let ran: Vec<String> = d.profile().into_iter().map(|k| k.kernel).collect();
        d.set_profiling(false);
        let mut want_y = vec![0.0; n * c * oh * ow];
        let mut want_dx = vec![0.0; n * c * h * w];
        for plane in 0..n * c {
            for oy in 0..oh {
                for ox in 0..ow {
                    // The first maximum in scan order; a NaN wins and stays.
                    let mut best = (f32::NEG_INFINITY, usize::MAX);
                    for ky in 0..k {
                        for kx in 0..k {
                            let i = (plane * h + oy * k + ky) * w + ox * k + kx;
                            if best.1 == usize::MAX
                                || (!best.0.is_nan() && (xv[i] > best.0 || xv[i].is_nan()))
                            {
                                best = (xv[i], i);
                            }
                        }
                    }
                    let o = (plane * oh + oy) * ow + ox;
                    want_y[o] = best.0 as f64;
                    want_dx[best.1] += gv[o] as f64;
                }
            }
        }
        let what = format!("{h}x{w} by {k}x{k}");
        // The NaN's window (the last plane's first), compared apart.
        let mut got = y.to_vec().unwrap();
        let nan = (n * c - 1) * oh * ow;
        assert!(got[nan].is_nan(), "{what}: {}", got[nan]);
        (got[nan], want_y[nan]) = (0.0, 0.0);
        let y = Tensor::from_slice(&got, y.dims(), &d).unwrap();
        assert_close(
            &format!("max_pool2d {what}"),
            &y,
            &Nd::new(y.dims(), want_y),
            0.0,
            0.0,
        );
        assert_close(
            &format!("max_pool2d grad {what}"),
            &x.grad().unwrap(),
            &Nd::new(&[n, c, h, w], want_dx),
            0.0,
            0.0,
        );
        let fast = k == 2 && w % 2 == 0;
        for kernel in ["max_pool2x2_fwd", "max_pool2x2_bwd"] {
            assert_eq!(ran.iter().any(|r| r == kernel), fast, "{what}: {ran:?}");
        }
    }
}

/// A convolution followed by relu in a `Sequential` runs as one pass (relu applied in the
/// kernel's store, no relu dispatch) and matches the f64 reference of conv2d + bias then relu,
/// forward and every gradient (dy masked where the output is 0), on the im2col path (32 output
/// channels on software adapters) and the convolution kernels (8).
#[test]
fn convolution_then_relu_runs_as_one_pass() {
    use kiln::nn::{Init, Module, Sequential};
    let d = own_device();
    let mut rng = Rng::new(95);
    for (xs, c_out) in [([2usize, 3, 8, 8], 32usize), ([3, 2, 7, 5], 8)] {
        let what = format!("{xs:?} -> {c_out}");
        let net = Sequential::from_spec(
            &mut Init::new(&d, 3),
            &format!("conv2d({},{c_out},3,p=1) relu", xs[1]),
        )
        .unwrap();
        let params = net.parameters();
        let (w, b) = (&params[0], &params[1]);
        let ws = [c_out, xs[1], 3, 3];
        let (wv, bv) = (w.to_vec().unwrap(), b.to_vec().unwrap());
        let xv = rng.vec(xs.iter().product(), -1.0, 1.0);
        let x = Tensor::from_slice(&xv, &xs, &d).unwrap().requires_grad();
        d.set_profiling(true);
        let y = net.forward(&x).unwrap();
        d.synchronize().unwrap();
        let ran: Vec<String> = d.profile().into_iter().map(|k| k.kernel).collect();
        d.set_profiling(false);
        // A separate relu over the (contiguous, whole-vec4) output would be unary_vec4_fwd.
        assert!(
            !ran.iter().any(|k| k == "unary_vec4_fwd"),
            "{what}: {ran:?}"
        );
        assert_eq!(y.numel() % 4, 0);
        let opts = Conv2dOptions {
            padding: [1, 1],
            ..Default::default()
        };
        let zeros = vec![0.0; y.numel()];
        let (pre, ..) = conv_reference(&xv, xs, &wv, ws, &opts, &zeros);
        let plane = y.numel() / xs[0] / c_out;
        let pre: Vec<f64> = pre
            .iter()
            .enumerate()
            .map(|(e, v)| v + bv[e / plane % c_out] as f64)
            .collect();
        let yr: Vec<f64> = pre.iter().map(|v| v.max(0.0)).collect();
        assert_close(
            &format!("forward {what}"),
            &y,
            &Nd::new(y.dims(), yr),
            1e-5,
            1e-5,
        );
        let dyv = rng.vec(y.numel(), -1.0, 1.0);
        let masked: Vec<f32> = dyv
            .iter()
            .zip(&pre)
            .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 })
            .collect();
        let dy = Tensor::from_slice(&dyv, y.dims(), &d).unwrap();
        y.backward_with(Some(&dy), false).unwrap();
        let (_, dx, dw, _) = conv_reference(&xv, xs, &wv, ws, &opts, &masked);
        let mut db = vec![0.0f64; c_out];
        for (e, &g) in masked.iter().enumerate() {
            db[e / plane % c_out] += g as f64;
        }
        assert_conv_grads(&what, (&x, dx), (w, dw), Some((b, db)));
    }
}

/// On the im2col path a weight whose depth is not a multiple of 4 is padded once while it
/// does not change (no fill or copy on the second call), and again after an in-place write
/// (`assign`, as an optimizer step): each output against the f64 reference of its weights.
#[test]
fn padded_weights_are_kept_until_the_weight_changes() {
    let d = own_device();
    let mut rng = Rng::new(97);
    let (xs, ws) = ([2usize, 1, 8, 8], [32usize, 1, 3, 3]);
    let opts = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    let xv = rng.vec(xs.iter().product(), -1.0, 1.0);
    let x = Tensor::from_slice(&xv, &xs, &d).unwrap();
    let w = Tensor::from_slice(&rng.vec(32 * 9, -1.0, 1.0), &ws, &d).unwrap();
    let zeros = vec![0.0; 2 * 32 * 64];
    for step in 0..3 {
        if step == 2 {
            w.assign(&Tensor::from_slice(&rng.vec(32 * 9, -1.0, 1.0), &ws, &d).unwrap())
                .unwrap();
        }
        d.set_profiling(true);
        let y = x.conv2d(&w, None, &opts).unwrap();
        d.synchronize().unwrap();
        let ran: Vec<String> = d.profile().into_iter().map(|k| k.kernel).collect();
        d.set_profiling(false);
        let (want, ..) = conv_reference(&xv, xs, &w.to_vec().unwrap(), ws, &opts, &zeros);
        assert_close(
            &format!("step {step}"),
            &y,
            &Nd::new(y.dims(), want),
            1e-5,
            1e-5,
        );
        if d.adapter_info().device_type == kiln::wgpu::DeviceType::Cpu {
            assert!(ran.iter().any(|k| k == "conv2d_im2col_fwd"), "{ran:?}");
            let padded = ran.iter().any(|k| k == "fill_fwd");
            assert_eq!(padded, step != 1, "step {step}: {ran:?}");
        }
    }
}

/// `conv2d relu maxpool2d` in a `Sequential` runs no relu pass forward or backward (relu in the
/// convolution's store, its gradient mask in the pool's backward) and matches the f64
/// reference of the three ops: 2x2 windows (the paired kernels) and 3x3 at stride 2 (the
/// general ones), on the im2col path and the convolution kernels.
#[test]
fn convolution_relu_max_pool_runs_without_relu_passes() {
    use kiln::nn::{Init, Module, Sequential};
    let d = own_device();
    let mut rng = Rng::new(99);
    let cases = [
        ([2usize, 3, 8, 8], 32usize, "maxpool2d(2)", [2usize, 2]),
        ([2, 2, 9, 7], 8, "maxpool2d(3,s=2)", [3, 2]),
    ];
    for (xs, c_out, pool, [k, s]) in cases {
        let what = format!("{xs:?} -> {c_out} {pool}");
        let spec = format!("conv2d({},{c_out},3,p=1) relu {pool}", xs[1]);
        let net = Sequential::from_spec(&mut Init::new(&d, 4), &spec).unwrap();
        let params = net.parameters();
        let (w, b) = (&params[0], &params[1]);
        let ws = [c_out, xs[1], 3, 3];
        let (wv, bv) = (w.to_vec().unwrap(), b.to_vec().unwrap());
        let xv = rng.vec(xs.iter().product(), -1.0, 1.0);
        let x = Tensor::from_slice(&xv, &xs, &d).unwrap().requires_grad();
        d.set_profiling(true);
        let y = net.forward(&x).unwrap();
        let dyv = rng.vec(y.numel(), -1.0, 1.0);
        let dy = Tensor::from_slice(&dyv, y.dims(), &d).unwrap();
        y.backward_with(Some(&dy), false).unwrap();
        d.synchronize().unwrap();
        let ran: Vec<String> = d.profile().into_iter().map(|k| k.kernel).collect();
        d.set_profiling(false);
        // Neither a relu forward pass nor its backward mask, in any elementwise kernel.
        let relu_pass = |k: &String| k.starts_with("unary_vec4") || k == "unary_bwd";
        assert!(!ran.iter().any(relu_pass), "{what}: {ran:?}");
        // The reference: pre = conv + bias, r = relu(pre), y = max pool of r (first maximum
        // in scan order), dr = dy at each window's maximum, dpre = dr where pre > 0.
        let opts = Conv2dOptions {
            padding: [1, 1],
            ..Default::default()
        };
        let (h, wd) = (xs[2], xs[3]);
        let (ph, pw) = ((h - k) / s + 1, (wd - k) / s + 1);
        assert_eq!(y.dims(), [xs[0], c_out, ph, pw], "{what}");
        let zeros = vec![0.0; xs[0] * c_out * h * wd];
        let (pre, ..) = conv_reference(&xv, xs, &wv, ws, &opts, &zeros);
        let pre: Vec<f64> = pre
            .iter()
            .enumerate()
            .map(|(e, v)| v + bv[e / (h * wd) % c_out] as f64)
            .collect();
        let mut yr = vec![0.0; y.numel()];
        let mut dpre = vec![0.0f32; pre.len()];
        for plane in 0..xs[0] * c_out {
            for oy in 0..ph {
                for ox in 0..pw {
                    let mut best = (f64::NEG_INFINITY, 0);
                    for ky in 0..k {
                        for kx in 0..k {
                            let at = plane * h * wd + (oy * s + ky) * wd + ox * s + kx;
                            if pre[at].max(0.0) > best.0 {
                                best = (pre[at].max(0.0), at);
                            }
                        }
                    }
                    let o = (plane * ph + oy) * pw + ox;
                    yr[o] = best.0;
                    if pre[best.1] > 0.0 {
                        dpre[best.1] += dyv[o];
                    }
                }
            }
        }
        assert_close(
            &format!("forward {what}"),
            &y,
            &Nd::new(y.dims(), yr),
            1e-5,
            1e-5,
        );
        let (_, dx, dw, _) = conv_reference(&xv, xs, &wv, ws, &opts, &dpre);
        let mut db = vec![0.0f64; c_out];
        for (e, &g) in dpre.iter().enumerate() {
            db[e / (h * wd) % c_out] += g as f64;
        }
        assert_conv_grads(&what, (&x, dx), (w, dw), Some((b, db)));
    }
}

/// The gradients of a conv2d's input, weight and (when given) bias against their f64
/// references, in the shapes of the tensors.
fn assert_conv_grads(
    what: &str,
    (x, dx): (&Tensor, Vec<f64>),
    (w, dw): (&Tensor, Vec<f64>),
    bias: Option<(&Tensor, Vec<f64>)>,
) {
    assert_close(
        &format!("dx {what}"),
        &x.grad().unwrap(),
        &Nd::new(x.dims(), dx),
        1e-5,
        1e-5,
    );
    assert_close(
        &format!("dw {what}"),
        &w.grad().unwrap(),
        &Nd::new(w.dims(), dw),
        1e-5,
        1e-5,
    );
    if let Some((b, db)) = bias {
        assert_close(
            &format!("db {what}"),
            &b.grad().unwrap(),
            &Nd::new(b.dims(), db),
            1e-5,
            1e-5,
        );
    }
}
