//! Each layer module built as a user builds it, run forward (and, for the normalisations,
//! backward to the parameters) against an f64 reference on random inputs of odd shapes.

mod common;

use common::*;
use kiln::nn::{
    AdaptiveAvgPool2d, AvgPool2d, ConvTranspose2d, Dropout, Embedding, Flatten, Gelu, Init,
    LayerNorm, LeakyRelu, Linear, MaxPool2d, Module, Relu, Residual, Sequential, Sigmoid, Silu,
    Tanh,
};
use kiln::{ConvTranspose2dOptions, Pool2dOptions, Tensor};

fn host(t: &Tensor) -> Vec<f64> {
    t.to_vec().unwrap().iter().map(|&v| v as f64).collect()
}

fn input(rng: &mut Rng, shape: &[usize]) -> (Tensor, Vec<f64>) {
    let v = rng.vec(shape.iter().product(), -2.0, 2.0);
    (
        Tensor::from_slice(&v, shape, &dev()).unwrap(),
        v.iter().map(|&x| x as f64).collect(),
    )
}

#[test]
fn conv_transpose2d_module() {
    let mut rng = Rng::new(1);
    let mut init = Init::new(&dev(), 1);
    // (n, c, h, w), out channels, kernel, stride, padding, output padding, dilation, groups
    let cases = [
        ([2, 4, 5, 3], 6, [3, 2], [2, 1], [1, 0], [1, 0], [1, 2], 2),
        ([1, 3, 4, 4], 2, [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], 1),
        ([3, 2, 3, 5], 3, [3, 3], [1, 3], [1, 1], [0, 2], [1, 1], 1),
    ];
    for ([n, c, h, w], o, [kh, kw], stride, padding, output_padding, dilation, groups) in cases {
        let options = ConvTranspose2dOptions {
            stride,
            padding,
            output_padding,
            dilation,
            groups,
        };
        let m = ConvTranspose2d::new(&mut init, c, o, [kh, kw], options, true).unwrap();
        let (x, xv) = input(&mut rng, &[n, c, h, w]);
        let y = m.forward(&x).unwrap();
        let (wv, bv) = (host(&m.weight), host(m.bias.as_ref().unwrap()));
        let oh =
            (h - 1) * stride[0] + dilation[0] * (kh - 1) + output_padding[0] + 1 - 2 * padding[0];
        let ow =
            (w - 1) * stride[1] + dilation[1] * (kw - 1) + output_padding[1] + 1 - 2 * padding[1];
        let (cg, og) = (c / groups, o / groups);
        let mut want = vec![0.0; n * o * oh * ow];
        for b in 0..n {
            for oc in 0..o {
                for i in 0..oh * ow {
                    want[(b * o + oc) * oh * ow + i] = bv[oc];
                }
            }
            // Each input pixel scatters its kernel-weighted value to the output.
            for ci in 0..c {
                let g = ci / cg;
                for iy in 0..h {
                    for ix in 0..w {
                        let xi = xv[((b * c + ci) * h + iy) * w + ix];
                        for j in 0..og {
                            let oc = g * og + j;
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let y = (iy * stride[0] + ky * dilation[0]) as isize
                                        - padding[0] as isize;
                                    let x = (ix * stride[1] + kx * dilation[1]) as isize
                                        - padding[1] as isize;
                                    if y < 0 || x < 0 || y as usize >= oh || x as usize >= ow {
                                        continue;
                                    }
                                    let wi = ((ci * og + j) * kh + ky) * kw + kx;
                                    want[((b * o + oc) * oh + y as usize) * ow + x as usize] +=
                                        xi * wv[wi];
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_close(
            &format!("ConvTranspose2d {:?}", m.describe()),
            &y,
            &Nd::new(&[n, o, oh, ow], want),
            1e-5,
            1e-5,
        );
    }
}

/// LayerNorm over the trailing [3, 4] of [2, 5, 3, 4] with a random weight and bias: the
/// output and the weight and bias gradients for a random upstream gradient.
#[test]
fn layer_norm_module() {
    let d = dev();
    let mut rng = Rng::new(2);
    let m = LayerNorm::new(&mut Init::new(&d, 0), &[3, 4]).unwrap();
    let (gamma, beta) = (rng.vec(12, 0.5, 1.5), rng.vec(12, -0.5, 0.5));
    let (w, b) = (m.weight.as_ref().unwrap(), m.bias.as_ref().unwrap());
    w.assign(&Tensor::from_slice(&gamma, &[3, 4], &d).unwrap())
        .unwrap();
    b.assign(&Tensor::from_slice(&beta, &[3, 4], &d).unwrap())
        .unwrap();
    let (x, xv) = input(&mut rng, &[2, 5, 3, 4]);
    let y = m.forward(&x).unwrap();
    let up = rng.vec(120, -1.0, 1.0);
    y.backward_with(
        Some(&Tensor::from_slice(&up, &[2, 5, 3, 4], &d).unwrap()),
        false,
    )
    .unwrap();
    let (mut want, mut gw, mut gb) = (vec![0.0; 120], vec![0.0; 12], vec![0.0; 12]);
    for row in 0..10 {
        let v = &xv[row * 12..row * 12 + 12];
        let mean = v.iter().sum::<f64>() / 12.0;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 12.0;
        for k in 0..12 {
            let xhat = (v[k] - mean) / (var + m.eps as f64).sqrt();
            want[row * 12 + k] = xhat * gamma[k] as f64 + beta[k] as f64;
            gw[k] += up[row * 12 + k] as f64 * xhat;
            gb[k] += up[row * 12 + k] as f64;
        }
    }
    assert_close(
        "LayerNorm output",
        &y,
        &Nd::new(&[2, 5, 3, 4], want),
        1e-5,
        1e-4,
    );
    assert_close(
        "LayerNorm weight gradient",
        &w.grad().unwrap(),
        &Nd::new(&[3, 4], gw),
        1e-5,
        1e-4,
    );
    assert_close(
        "LayerNorm bias gradient",
        &b.grad().unwrap(),
        &Nd::new(&[3, 4], gb),
        1e-5,
        1e-4,
    );
}

/// Embedding rows picked by indices of shape [3, 4] (repeats included), and the weight
/// gradient: each row the sum of the upstream rows that picked it.
#[test]
fn embedding_module() {
    let d = dev();
    let mut rng = Rng::new(3);
    let m = Embedding::new(&mut Init::new(&d, 4), 7, 5).unwrap();
    let table = host(&m.weight);
    let idx: Vec<f32> = (0..12)
        .map(|i| if i < 3 { 6.0 } else { rng.below(7) as f32 })
        .collect();
    let y = m
        .forward(&Tensor::from_slice(&idx, &[3, 4], &d).unwrap())
        .unwrap();
    let want: Vec<f64> = idx
        .iter()
        .flat_map(|&i| table[i as usize * 5..i as usize * 5 + 5].to_vec())
        .collect();
    assert_close("Embedding output", &y, &Nd::new(&[3, 4, 5], want), 0.0, 0.0);
    let up = rng.vec(60, -1.0, 1.0);
    y.backward_with(
        Some(&Tensor::from_slice(&up, &[3, 4, 5], &d).unwrap()),
        false,
    )
    .unwrap();
    let mut g = vec![0.0; 35];
    for (k, &i) in idx.iter().enumerate() {
        for j in 0..5 {
            g[i as usize * 5 + j] += up[k * 5 + j] as f64;
        }
    }
    assert_close(
        "Embedding gradient",
        &m.weight.grad().unwrap(),
        &Nd::new(&[7, 5], g),
        1e-6,
        1e-6,
    );
}

/// f64 pooling over windows: `windows(oy, ox)` lists the input positions of each output (None
/// for padding), and `combine` reduces them.
fn pool_reference(
    xv: &[f64],
    [n, c, h, w]: [usize; 4],
    [oh, ow]: [usize; 2],
    windows: &dyn Fn(usize, usize) -> Vec<Option<(usize, usize)>>,
    combine: &dyn Fn(&[Option<f64>]) -> f64,
) -> Nd {
    let mut out = Vec::with_capacity(n * c * oh * ow);
    for plane in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let vals: Vec<Option<f64>> = windows(oy, ox)
                    .into_iter()
                    .map(|p| p.map(|(y, x)| xv[(plane * h + y) * w + x]))
                    .collect();
                out.push(combine(&vals));
            }
        }
    }
    Nd::new(&[n, c, oh, ow], out)
}

#[test]
fn pooling_modules() {
    let mut rng = Rng::new(5);
    let (n, c, h, w) = (2, 3, 7, 9);
    let (x, xv) = input(&mut rng, &[n, c, h, w]);
    let window = |k: [usize; 2], s: [usize; 2], p: [usize; 2], d: [usize; 2]| {
        move |oy: usize, ox: usize| {
            let mut v = Vec::new();
            for ky in 0..k[0] {
                for kx in 0..k[1] {
                    let y = (oy * s[0] + ky * d[0]) as isize - p[0] as isize;
                    let x = (ox * s[1] + kx * d[1]) as isize - p[1] as isize;
                    v.push(
                        (y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w)
                            .then_some((y as usize, x as usize)),
                    );
                }
            }
            v
        }
    };
    let out = |k: usize, s: usize, p: usize, d: usize, len: usize| {
        (len + 2 * p - d * (k - 1) - 1) / s + 1
    };
    for count_include_pad in [true, false] {
        let opts = Pool2dOptions {
            kernel: [3, 2],
            stride: [2, 3],
            padding: [1, 1],
            dilation: [1, 1],
            count_include_pad,
        };
        let y = AvgPool2d(opts).forward(&x).unwrap();
        let shape = [out(3, 2, 1, 1, h), out(2, 3, 1, 1, w)];
        let want = pool_reference(
            &xv,
            [n, c, h, w],
            shape,
            &window([3, 2], [2, 3], [1, 1], [1, 1]),
            &|v| {
                let real: Vec<f64> = v.iter().flatten().copied().collect();
                let div = if count_include_pad {
                    v.len()
                } else {
                    real.len()
                };
                real.iter().sum::<f64>() / div as f64
            },
        );
        assert_close(
            &format!("AvgPool2d count_include_pad {count_include_pad}"),
            &y,
            &want,
            1e-6,
            1e-5,
        );
    }
    let opts = Pool2dOptions {
        kernel: [2, 3],
        stride: [2, 2],
        padding: [1, 1],
        dilation: [2, 1],
        count_include_pad: true,
    };
    let y = MaxPool2d(opts).forward(&x).unwrap();
    let shape = [out(2, 2, 1, 2, h), out(3, 2, 1, 1, w)];
    let want = pool_reference(
        &xv,
        [n, c, h, w],
        shape,
        &window([2, 3], [2, 2], [1, 1], [2, 1]),
        &|v| v.iter().flatten().copied().fold(f64::MIN, f64::max),
    );
    assert_close("MaxPool2d", &y, &want, 0.0, 0.0);
    // Adaptive average pooling: bin i covers floor(i H / o) .. ceil((i + 1) H / o).
    for size in [[3, 4], [1, 1], [7, 9], [4, 2]] {
        let y = AdaptiveAvgPool2d(size).forward(&x).unwrap();
        let bins = |i: usize, len: usize, o: usize| (i * len / o, ((i + 1) * len).div_ceil(o));
        let want = pool_reference(
            &xv,
            [n, c, h, w],
            size,
            &|oy, ox| {
                let ((y0, y1), (x0, x1)) = (bins(oy, h, size[0]), bins(ox, w, size[1]));
                (y0..y1)
                    .flat_map(|y| (x0..x1).map(move |x| Some((y, x))))
                    .collect()
            },
            &|v| v.iter().flatten().sum::<f64>() / v.len() as f64,
        );
        assert_close(
            &format!("AdaptiveAvgPool2d {size:?}"),
            &y,
            &want,
            1e-6,
            1e-5,
        );
    }
}

/// The activation modules, default and explicit LeakyReLU slopes included, on values that
/// cross zero.
#[test]
fn activation_modules() {
    let mut rng = Rng::new(6);
    let (x, xv) = input(&mut rng, &[5, 13]);
    let erf_gelu = |v: f64| 0.5 * v * (1.0 + erf(v / 2f64.sqrt()));
    type Case = (Box<dyn Module>, Box<dyn Fn(f64) -> f64>);
    let cases: Vec<Case> = vec![
        (Box::new(Relu), Box::new(|v: f64| v.max(0.0))),
        (Box::new(Gelu), Box::new(erf_gelu)),
        (Box::new(Tanh), Box::new(f64::tanh)),
        (
            Box::new(Sigmoid),
            Box::new(|v: f64| 1.0 / (1.0 + (-v).exp())),
        ),
        (Box::new(Silu), Box::new(|v: f64| v / (1.0 + (-v).exp()))),
        (
            Box::new(LeakyRelu::default()),
            Box::new(|v: f64| if v >= 0.0 { v } else { 0.01 * v }),
        ),
        (
            Box::new(LeakyRelu(0.3)),
            Box::new(|v: f64| if v >= 0.0 { v } else { 0.3 * v }),
        ),
    ];
    for (m, f) in cases {
        let want = Nd::new(&[5, 13], xv.iter().map(|&v| f(v)).collect());
        assert_close(&m.describe(), &m.forward(&x).unwrap(), &want, 1e-6, 1e-5);
    }
}

/// f64 2-D convolution without groups or dilation: `(y, [oh, ow])`.
fn conv_f64(
    x: &[f64],
    [n, c, h, w]: [usize; 4],
    wt: &[f64],
    [o, k]: [usize; 2],
    stride: usize,
    pad: usize,
) -> (Vec<f64>, [usize; 2]) {
    let (oh, ow) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let mut y = vec![0.0; n * o * oh * ow];
    for b in 0..n {
        for oc in 0..o {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = 0.0;
                    for ci in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    s += x[((b * c + ci) * h + iy as usize) * w + ix as usize]
                                        * wt[((oc * c + ci) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                    y[((b * o + oc) * oh + oy) * ow + ox] = s;
                }
            }
        }
    }
    (y, [oh, ow])
}

/// torchvision's BasicBlock in eval mode, with a projection shortcut (stride 2, 3 -> 4
/// channels) and with the identity (4 -> 4), every batch-norm tensor set to random values.
#[test]
fn residual_basic_block_in_eval_mode() {
    let d = dev();
    let mut rng = Rng::new(9);
    for (cin, cout, stride) in [(3, 4, 2), (4, 4, 1)] {
        let mut block = Residual::basic_block(&mut Init::new(&d, 2), cin, cout, stride).unwrap();
        for (name, t, _) in block.state_dict() {
            let v: Vec<f32> = if name.ends_with("num_batches_tracked") {
                continue;
            } else if name.ends_with("running_var") || (name.ends_with("weight") && t.rank() == 1) {
                rng.vec(t.numel(), 0.5, 1.5)
            } else {
                rng.vec(t.numel(), -0.5, 0.5)
            };
            t.assign(&Tensor::from_slice(&v, t.dims(), &d).unwrap())
                .unwrap();
        }
        block.set_training(false);
        let state: std::collections::HashMap<String, Vec<f64>> = block
            .state_dict()
            .into_iter()
            .map(|(n, t, _)| (n, host(&t)))
            .collect();
        let (n, h, w) = (2, 7, 6);
        let (x, xv) = input(&mut rng, &[n, cin, h, w]);
        let bn = |y: &mut [f64], prefix: &str, plane: usize| {
            let get = |s: &str| &state[&format!("{prefix}.{s}")];
            let (g, b, m, v) = (
                get("weight"),
                get("bias"),
                get("running_mean"),
                get("running_var"),
            );
            for (i, val) in y.iter_mut().enumerate() {
                let ch = (i / plane) % cout;
                *val = (*val - m[ch]) / (v[ch] + 1e-5).sqrt() * g[ch] + b[ch];
            }
        };
        let (mut a, [oh, ow]) = conv_f64(
            &xv,
            [n, cin, h, w],
            &state["conv1.weight"],
            [cout, 3],
            stride,
            1,
        );
        bn(&mut a, "bn1", oh * ow);
        a.iter_mut().for_each(|v| *v = v.max(0.0));
        let (mut a, _) = conv_f64(
            &a,
            [n, cout, oh, ow],
            &state["conv2.weight"],
            [cout, 3],
            1,
            1,
        );
        bn(&mut a, "bn2", oh * ow);
        let skip = if state.contains_key("downsample.0.weight") {
            let (mut s, _) = conv_f64(
                &xv,
                [n, cin, h, w],
                &state["downsample.0.weight"],
                [cout, 1],
                stride,
                0,
            );
            bn(&mut s, "downsample.1", oh * ow);
            s
        } else {
            xv.clone()
        };
        let want: Vec<f64> = a.iter().zip(&skip).map(|(a, s)| (a + s).max(0.0)).collect();
        assert_close(
            &format!("BasicBlock {cin}->{cout} stride {stride}"),
            &block.forward(&x).unwrap(),
            &Nd::new(&[n, cout, oh, ow], want),
            1e-5,
            1e-4,
        );
    }
}

/// `Residual::new` with a linear body and a linear shortcut, and Linear without a bias.
#[test]
fn residual_and_linear_without_bias() {
    let d = dev();
    let mut rng = Rng::new(10);
    let mut init = Init::new(&d, 3);
    let lin = Linear::new(&mut init, 5, 3, false).unwrap();
    assert!(lin.bias.is_none());
    let (wv, (x, xv)) = (host(&lin.weight), input(&mut rng, &[4, 5]));
    let matvec = |w: &[f64], k: usize, o: usize, x: &[f64]| -> Vec<f64> {
        (0..x.len() / k * o)
            .map(|i| {
                (0..k)
                    .map(|j| w[(i % o) * k + j] * x[(i / o) * k + j])
                    .sum()
            })
            .collect()
    };
    let want = matvec(&wv, 5, 3, &xv);
    assert_close(
        "Linear without bias",
        &lin.forward(&x).unwrap(),
        &Nd::new(&[4, 3], want.clone()),
        1e-6,
        1e-5,
    );
    let short = Linear::new(&mut init, 5, 3, false).unwrap();
    let sv = host(&short.weight);
    for relu in [false, true] {
        let block = Residual::new(
            Sequential::new().add(Linear::new(&mut Init::new(&d, 3), 5, 3, false).unwrap()),
            Some(Sequential::new().add(Linear::new(&mut Init::new(&d, 7), 5, 3, false).unwrap())),
            relu,
        );
        let short_w = host(&block.shortcut.as_ref().unwrap().parameters()[0]);
        assert_ne!(short_w, sv, "a different shortcut weight");
        let s = matvec(&short_w, 5, 3, &xv);
        let want: Vec<f64> = want
            .iter()
            .zip(&s)
            .map(|(a, b)| if relu { (a + b).max(0.0) } else { a + b })
            .collect();
        assert_close(
            &format!("Residual relu {relu}"),
            &block.forward(&x).unwrap(),
            &Nd::new(&[4, 3], want),
            1e-6,
            1e-5,
        );
    }
}

/// Dropout as a module: in training each output is 0 or x / (1 - p), about p of them 0, a new
/// mask each call; in eval the input itself.
#[test]
fn dropout_module() {
    let d = dev();
    let mut m = Dropout::new(&mut Init::new(&d, 1), 0.3).unwrap();
    let (x, xv) = input(&mut Rng::new(11), &[40, 50]);
    let a = m.forward(&x).unwrap().to_vec().unwrap();
    let b = m.forward(&x).unwrap().to_vec().unwrap();
    assert_ne!(a, b, "a new mask each call");
    let mut dropped = 0;
    for (i, &y) in a.iter().enumerate() {
        if y == 0.0 && xv[i] != 0.0 {
            dropped += 1;
        } else {
            let want = xv[i] / 0.7;
            assert!(
                (y as f64 - want).abs() <= 1e-6 * want.abs(),
                "[{i}]: {y} vs {want}"
            );
        }
    }
    // 2,000 draws: the standard error of the fraction is about 0.01.
    let frac = dropped as f64 / 2000.0;
    assert!((frac - 0.3).abs() < 0.05, "dropped fraction {frac}");
    m.set_training(false);
    assert_eq!(
        m.forward(&x).unwrap().to_vec().unwrap(),
        x.to_vec().unwrap()
    );
}

#[test]
fn flatten_module_with_start_and_end() {
    let (x, xv) = input(&mut Rng::new(12), &[2, 3, 4, 5]);
    for (start, end, shape) in [
        (1, -1, vec![2, 60]),
        (0, 1, vec![6, 4, 5]),
        (1, 2, vec![2, 12, 5]),
        (-2, -1, vec![2, 3, 20]),
        (2, 2, vec![2, 3, 4, 5]),
    ] {
        let y = Flatten { start, end }.forward(&x).unwrap();
        assert_close(
            &format!("Flatten({start}, {end})"),
            &y,
            &Nd::new(&shape, xv.clone()),
            0.0,
            0.0,
        );
    }
    assert!(Flatten { start: 3, end: 1 }.forward(&x).is_err());
    assert!(Flatten { start: 0, end: 4 }.forward(&x).is_err());
}

/// group_norm and batch_norm without affine parameters.
#[test]
fn normalisation_without_affine_parameters() {
    let mut rng = Rng::new(13);
    let (n, c, hw) = (3, 6, 5);
    let (x, xv) = input(&mut rng, &[n, c, hw]);
    for groups in [1, 2, 3, 6] {
        let y = x.group_norm(groups, None, None, 1e-5).unwrap();
        let per = c / groups * hw;
        let mut want = vec![0.0; xv.len()];
        for (chunk, out) in xv.chunks(per).zip(want.chunks_mut(per)) {
            let m = chunk.iter().sum::<f64>() / per as f64;
            let v = chunk.iter().map(|x| (x - m).powi(2)).sum::<f64>() / per as f64;
            for (o, x) in out.iter_mut().zip(chunk) {
                *o = (x - m) / (v + 1e-5).sqrt();
            }
        }
        assert_close(
            &format!("group_norm {groups} groups"),
            &y,
            &Nd::new(&[n, c, hw], want),
            1e-5,
            1e-4,
        );
    }
    let y = x
        .batch_norm(None, None, None, None, true, 0.1, 1e-5)
        .unwrap();
    let mut want = vec![0.0; xv.len()];
    for ch in 0..c {
        let idx: Vec<usize> = (0..n)
            .flat_map(|b| (0..hw).map(move |k| (b * c + ch) * hw + k))
            .collect();
        let m = idx.iter().map(|&i| xv[i]).sum::<f64>() / idx.len() as f64;
        let v = idx.iter().map(|&i| (xv[i] - m).powi(2)).sum::<f64>() / idx.len() as f64;
        for &i in &idx {
            want[i] = (xv[i] - m) / (v + 1e-5).sqrt();
        }
    }
    assert_close(
        "batch_norm without affine or running statistics",
        &y,
        &Nd::new(&[n, c, hw], want),
        1e-5,
        1e-4,
    );
}

/// Every layer a spec can name builds the module with the options the spec says: the same
/// parameters and the same outputs, bit for bit, as the module built by hand (which the tests
/// above check against f64) from the same seed.
#[test]
fn spec_layers_build_the_modules_they_name() {
    use kiln::nn::BatchNorm;
    use kiln::{Conv2dOptions, ConvTranspose2dOptions};
    let d = dev();
    type Build = Box<dyn Fn(&mut Init) -> Sequential>;
    fn seq(m: impl Module + 'static) -> Sequential {
        Sequential::new().add(m)
    }
    let conv = |s: usize, p: usize, dl: usize, g: usize| Conv2dOptions {
        stride: [s; 2],
        padding: [p; 2],
        dilation: [dl; 2],
        groups: g,
    };
    let cases: Vec<(&str, Vec<usize>, Build)> = vec![
        (
            "linear(6,4)",
            vec![3, 6],
            Box::new(|i| seq(Linear::new(i, 6, 4, true).unwrap())),
        ),
        (
            "linear(6,4,bias=false)",
            vec![3, 6],
            Box::new(|i| seq(Linear::new(i, 6, 4, false).unwrap())),
        ),
        (
            "conv2d(4,6,3,s=2,p=1,d=1,g=2)",
            vec![2, 4, 7, 7],
            Box::new(move |i| {
                seq(kiln::nn::Conv2d::new(i, 4, 6, [3, 3], conv(2, 1, 1, 2), true).unwrap())
            }),
        ),
        (
            "conv_transpose2d(4,2,2,s=2)",
            vec![2, 4, 3, 3],
            Box::new(|i| {
                let o = ConvTranspose2dOptions {
                    stride: [2, 2],
                    padding: [0, 0],
                    output_padding: [0, 0],
                    dilation: [1, 1],
                    groups: 1,
                };
                seq(ConvTranspose2d::new(i, 4, 2, [2, 2], o, true).unwrap())
            }),
        ),
        (
            "batchnorm1d(6,eps=1e-3,momentum=0.2)",
            vec![5, 6],
            Box::new(|i| {
                let mut b = BatchNorm::new_1d(i, 6).unwrap();
                b.eps = 1e-3;
                b.momentum = 0.2;
                seq(b)
            }),
        ),
        (
            "batchnorm2d(4)",
            vec![2, 4, 3, 3],
            Box::new(|i| seq(BatchNorm::new_2d(i, 4).unwrap())),
        ),
        (
            "layernorm(6)",
            vec![3, 6],
            Box::new(|i| seq(LayerNorm::new(i, &[6]).unwrap())),
        ),
        (
            "maxpool2d(2)",
            vec![2, 3, 5, 5],
            Box::new(|_| seq(MaxPool2d(Pool2dOptions::new([2, 2])))),
        ),
        (
            "avgpool2d(3,s=1,p=1)",
            vec![2, 3, 5, 5],
            Box::new(|_| {
                let mut o = Pool2dOptions::new([3, 3]);
                o.stride = [1, 1];
                o.padding = [1, 1];
                seq(AvgPool2d(o))
            }),
        ),
        (
            "adaptive_avgpool2d(2,3)",
            vec![2, 3, 5, 7],
            Box::new(|_| seq(AdaptiveAvgPool2d([2, 3]))),
        ),
        (
            "flatten(start=2)",
            vec![2, 3, 4, 5],
            Box::new(|_| seq(Flatten { start: 2, end: -1 })),
        ),
        (
            "embedding(10,4)",
            vec![3, 2],
            Box::new(|i| seq(Embedding::new(i, 10, 4).unwrap())),
        ),
        (
            "basicblock(4,6,2)",
            vec![2, 4, 6, 6],
            Box::new(|i| seq(Residual::basic_block(i, 4, 6, 2).unwrap())),
        ),
        (
            "leaky_relu(slope=0.2)",
            vec![3, 6],
            Box::new(|_| seq(LeakyRelu(0.2))),
        ),
        (
            "leaky_relu",
            vec![3, 6],
            Box::new(|_| seq(LeakyRelu::default())),
        ),
        ("gelu", vec![3, 6], Box::new(|_| seq(Gelu))),
    ];
    for (spec, shape, build) in cases {
        let mut from_spec = Sequential::from_spec(&mut Init::new(&d, 4), spec)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        let mut by_hand = build(&mut Init::new(&d, 4));
        let names = |m: &Sequential| -> Vec<(String, Vec<f32>)> {
            m.state_dict()
                .into_iter()
                .map(|(n, t, _)| (n, t.to_vec().unwrap()))
                .collect()
        };
        assert_eq!(names(&from_spec), names(&by_hand), "{spec}: state dict");
        let x = if spec.starts_with("embedding") {
            Tensor::from_slice(&[1.0, 9.0, 0.0, 4.0, 4.0, 7.0], &shape, &d).unwrap()
        } else {
            Tensor::randn(&shape, 5, &d).unwrap()
        };
        for training in [true, false] {
            from_spec.set_training(training);
            by_hand.set_training(training);
            assert_eq!(
                from_spec.forward(&x).unwrap().to_vec().unwrap(),
                by_hand.forward(&x).unwrap().to_vec().unwrap(),
                "{spec}: output, training {training}"
            );
        }
    }
}
