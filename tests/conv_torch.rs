//! Convolution, pooling and normalisation against PyTorch: fixtures from
//! tests/fixtures/gen_autograd.py (tests/fixtures/conv.txt).

mod common;

use common::*;
use kiln::{Conv2dOptions, ConvTranspose2dOptions, Pool2dOptions, Result, Tensor};

/// `key` -> value of a case name like `conv2d:n2:k3x3:...`; pairs `AxB` become [A, B].
fn field(name: &str, key: &str) -> Vec<usize> {
    let part = name
        .split(':')
        .skip(1)
        .find(|p| {
            p.starts_with(key)
                && p[key.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
        })
        .unwrap_or_else(|| panic!("{name} has no {key}"));
    part[key.len()..]
        .split('x')
        .map(|v| v.parse().unwrap())
        .collect()
}

fn pair(name: &str, key: &str) -> [usize; 2] {
    let v = field(name, key);
    [v[0], v[1]]
}

fn one(name: &str, key: &str) -> usize {
    field(name, key)[0]
}

fn run(name: &str, x: &[Tensor]) -> Result<Tensor> {
    let kind = name.split(':').next().unwrap_or(name);
    Ok(match kind {
        "conv2d" => {
            let opts = Conv2dOptions {
                stride: pair(name, "s"),
                padding: pair(name, "p"),
                dilation: pair(name, "d"),
                groups: one(name, "g"),
            };
            x[0].conv2d(&x[1], x.get(2), &opts)?
        }
        "conv1d" => x[0].conv1d(
            &x[1],
            Some(&x[2]),
            one(name, "s"),
            one(name, "p"),
            one(name, "d"),
            one(name, "g"),
        )?,
        "conv_transpose2d" => {
            let opts = ConvTranspose2dOptions {
                stride: pair(name, "s"),
                padding: pair(name, "p"),
                output_padding: pair(name, "op"),
                dilation: pair(name, "d"),
                groups: one(name, "g"),
            };
            x[0].conv_transpose2d(&x[1], x.get(2), &opts)?
        }
        "max_pool2d" => {
            let mut o = Pool2dOptions::new(pair(name, "k"));
            o.stride = pair(name, "s");
            o.padding = pair(name, "p");
            o.dilation = pair(name, "d");
            x[0].max_pool2d(&o)?
        }
        "avg_pool2d" => {
            let mut o = Pool2dOptions::new(pair(name, "k"));
            o.stride = pair(name, "s");
            o.padding = pair(name, "p");
            o.count_include_pad = one(name, "cip") == 1;
            x[0].avg_pool2d(&o)?
        }
        "adaptive_avg_pool2d" => x[0].adaptive_avg_pool2d(pair(name, "o"))?,
        "batch_norm_train" | "batch_norm_1d_train" => x[0].batch_norm(
            Some(&x[3]),
            Some(&x[4]),
            Some(&x[1]),
            Some(&x[2]),
            true,
            0.1,
            1e-5,
        )?,
        "batch_norm_eval" => x[0].batch_norm(
            Some(&x[3]),
            Some(&x[4]),
            Some(&x[1]),
            Some(&x[2]),
            false,
            0.1,
            1e-5,
        )?,
        "layer_norm" => x[0].layer_norm(&[4, 5], Some(&x[1]), Some(&x[2]), 1e-5)?,
        "layer_norm_plain" => x[0].layer_norm(&[7], None, None, 1e-5)?,
        "group_norm" => x[0].group_norm(3, Some(&x[1]), Some(&x[2]), 1e-5)?,
        "lenet" => lenet(x)?,
        other => panic!("fixture case {other} has no kiln counterpart"),
    })
}

/// conv-bn-relu-pool, conv-relu-pool, linear-relu-linear, cross-entropy (dropout off).
fn lenet(p: &[Tensor]) -> Result<Tensor> {
    let pad2 = Conv2dOptions {
        padding: [2, 2],
        ..Default::default()
    };
    let pool = Pool2dOptions::new([2, 2]);
    let h = p[0].conv2d(&p[1], Some(&p[2]), &pad2)?;
    let h = h.batch_norm(None, None, Some(&p[3]), Some(&p[4]), true, 0.1, 1e-5)?;
    let h = h.relu()?.max_pool2d(&pool)?;
    let h = h
        .conv2d(&p[5], Some(&p[6]), &Default::default())?
        .relu()?
        .max_pool2d(&pool)?;
    let h = h.flatten(1, -1)?.matmul(&p[7].t()?)?.add(&p[8])?.relu()?;
    let logits = h.matmul(&p[9].t()?)?.add(&p[10])?;
    kiln::loss::cross_entropy(&logits, &p[11], &Default::default())
}

fn cases() -> Vec<Case> {
    load(include_str!("fixtures/conv.txt"))
}

/// The fixture families each test below reads, with their exact counts (the generator's grid):
/// a renamed prefix or a lost case fails here rather than passing with fewer cases.
const FAMILIES: [(&str, usize); 5] = [
    ("conv2d", 42),
    ("conv1d_transpose", 8),
    ("pool", 12),
    ("norm", 6),
    ("lenet", 1),
];

fn family(name: &str) -> &'static str {
    if name.starts_with("conv2d:") {
        "conv2d"
    } else if name.starts_with("conv1d:") || name.starts_with("conv_transpose2d:") {
        "conv1d_transpose"
    } else if name.contains("pool2d:") {
        "pool"
    } else if name.contains("norm") {
        "norm"
    } else if name == "lenet" {
        "lenet"
    } else {
        "none"
    }
}

fn family_cases(f: &str) -> Vec<Case> {
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| family(&c.name) == f)
        .collect();
    let want = FAMILIES.iter().find(|(n, _)| *n == f).unwrap().1;
    assert_eq!(cases.len(), want, "fixture cases of family {f}");
    cases
}

#[test]
fn every_fixture_case_belongs_to_a_tested_family() {
    let all = cases();
    for c in &all {
        assert_ne!(family(&c.name), "none", "{} is read by no test", c.name);
    }
    assert_eq!(all.len(), FAMILIES.iter().map(|(_, n)| n).sum::<usize>());
}

/// Tolerances: f32 sums of up to a few hundred products on both sides, in different orders:
/// atol 1e-4 + rtol 1e-4 (values are O(1) to O(10)).
#[test]
fn conv2d_grid_matches_pytorch() {
    let cases = family_cases("conv2d");
    for c in &cases {
        let x = leaves(c);
        let y = run(&c.name, &x).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        check_case(c, &x, &y, 1e-4, 1e-4);
        // The shared-memory tiled forward kernel (used on GPUs for larger layers) as well.
        let opts = Conv2dOptions {
            stride: pair(&c.name, "s"),
            padding: pair(&c.name, "p"),
            dilation: pair(&c.name, "d"),
            groups: one(&c.name, "g"),
        };
        let mut tiled = x[0]
            .detach()
            .conv2d_forward_with(&x[1].detach(), &opts, kiln::kernels::Kernel::Conv2dTiledFwd)
            .unwrap();
        if let Some(b) = x.get(2) {
            tiled = tiled
                .add(&b.detach().reshape(&[1, -1, 1, 1]).unwrap())
                .unwrap();
        }
        assert_close(
            &format!("{} tiled forward", c.name),
            &tiled,
            &c.out,
            1e-4,
            1e-4,
        );
        // And the tiled input-gradient kernel, for the fixture's upstream gradient.
        let dx = tensor(&c.w)
            .conv2d_input_grad_with(
                &x[1].detach(),
                x[0].dims(),
                &opts,
                kiln::kernels::Kernel::Conv2dBwdInputTiled,
            )
            .unwrap();
        let want = c.grads[0].as_ref().expect("input gradient");
        assert_close(
            &format!("{} tiled input gradient", c.name),
            &dx,
            want,
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn conv1d_and_conv_transpose2d_match_pytorch() {
    for c in &family_cases("conv1d_transpose") {
        let x = leaves(c);
        let y = run(&c.name, &x).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        check_case(c, &x, &y, 1e-4, 1e-4);
    }
}

#[test]
fn pooling_matches_pytorch() {
    let cases = family_cases("pool");
    for c in &cases {
        let x = leaves(c);
        let y = run(&c.name, &x).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        check_case(c, &x, &y, 1e-5, 1e-5);
    }
}

#[test]
fn normalisation_matches_pytorch() {
    for c in &family_cases("norm") {
        let x = leaves(c);
        let y = run(&c.name, &x).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        check_case(c, &x, &y, 5e-5, 1e-4);
        // Running statistics after the training step (momentum 0.1, unbiased variance).
        for (k, want) in c.extra.iter().enumerate() {
            assert_close(
                &format!("{} running stat {k}", c.name),
                &x[3 + k],
                want,
                1e-6,
                1e-5,
            );
        }
        if c.name.ends_with("_train") {
            assert_eq!(
                c.extra.len(),
                2,
                "{}: running statistics are checked",
                c.name
            );
        }
    }
}

/// The LeNet-shaped network: the loss and each parameter gradient within 1e-4 relative error
/// (L2 norm) of PyTorch's (except one that is exactly zero, see below).
#[test]
fn lenet_matches_pytorch() {
    let c = family_cases("lenet").remove(0);
    let p = leaves(&c);
    let loss = lenet(&p).unwrap();
    let l = loss.to_scalar().unwrap() as f64;
    assert!(
        (l - c.out.data[0]).abs() <= 1e-4 * c.out.data[0].abs(),
        "loss {l} vs {}",
        c.out.data[0]
    );
    loss.backward_with(Some(&tensor(&c.w)), false).unwrap();
    for (i, param) in p.iter().enumerate().take(11).skip(1) {
        let got = param.grad().unwrap().to_vec().unwrap();
        let want = &c.grads[i].as_ref().unwrap().data;
        assert_eq!(got.len(), want.len(), "parameter {i}: gradient length");
        let err: f64 = got
            .iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
        if i == 2 {
            // conv1's bias feeds batch norm, which subtracts it again: its gradient is zero in
            // exact arithmetic (PyTorch's entries are rounding noise below 1e-7).
            assert!(
                norm < 1e-6 && got.iter().all(|g| g.abs() < 1e-5),
                "bias before batch norm: {got:?}"
            );
            continue;
        }
        assert!(
            err / norm < 1e-4,
            "parameter {i}: relative error {}",
            err / norm
        );
    }
}
