//! Finite-difference checks of every differentiable op, running the real GPU kernels.
//!
//! For an op y = f(x...) and a random upstream gradient w, the loss is L = sum(w * y),
//! evaluated in f64 on the host from the f32 outputs. Central differences
//! (L(x + h) - L(x - h)) / 2h with h = 1e-2 have truncation error h^2/6 |L'''| ~ 2e-5 for the
//! smooth O(1) functions here, and rounding error ~ 1e-7 |L| / h ~ 1e-5 from the f32 outputs;
//! so atol 1e-3 + rtol 1e-2 separates a right gradient from a wrong one with a wide margin.
//! Inputs stay at least 0.1 (10 h) away from kinks: relu and abs at 0, clamp bounds, ties of
//! max/min/maximum.

mod common;

use common::*;
use kiln::loss::{self, CrossEntropyOptions, Reduction};
use kiln::{Result, Tensor};

type F = fn(&[Tensor]) -> Result<Tensor>;

#[test]
fn unary_ops() {
    let mut r = Rng::new(1);
    let cases: Vec<(&str, Input, F)> = vec![
        ("neg", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| x[0].neg()),
        ("abs", off_zero(&mut r, &[2, 3]), |x| x[0].abs()),
        ("exp", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| x[0].exp()),
        ("log", smooth(&mut r, &[2, 3], 0.5, 3.0), |x| x[0].log()),
        ("sqrt", smooth(&mut r, &[2, 3], 0.5, 3.0), |x| x[0].sqrt()),
        ("rsqrt", smooth(&mut r, &[2, 3], 0.5, 3.0), |x| x[0].rsqrt()),
        ("relu", off_zero(&mut r, &[2, 3]), |x| x[0].relu()),
        ("leaky_relu", off_zero(&mut r, &[2, 3]), |x| {
            x[0].leaky_relu(0.2)
        }),
        ("sigmoid", smooth(&mut r, &[2, 3], -3.0, 3.0), |x| {
            x[0].sigmoid()
        }),
        ("tanh", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| x[0].tanh()),
        ("gelu", smooth(&mut r, &[2, 3], -3.0, 3.0), |x| x[0].gelu()),
        ("silu", smooth(&mut r, &[2, 3], -3.0, 3.0), |x| x[0].silu()),
        ("powf", smooth(&mut r, &[2, 3], 0.5, 2.0), |x| {
            x[0].powf(2.5)
        }),
        ("clamp", off_zero(&mut r, &[2, 3]), |x| {
            x[0].clamp(-1.05, 1.05)
        }),
        ("square", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| {
            x[0].square()
        }),
        ("add_scalar", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| {
            x[0].add_scalar(0.7)
        }),
        ("sub_scalar", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| {
            x[0].sub_scalar(0.7)
        }),
        ("mul_scalar", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| {
            x[0].mul_scalar(-1.7)
        }),
        ("div_scalar", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| {
            x[0].div_scalar(1.7)
        }),
        ("pow_scalar", smooth(&mut r, &[2, 3], 0.5, 2.0), |x| {
            x[0].pow_scalar(3.0)
        }),
        ("rsub_scalar", smooth(&mut r, &[2, 3], -2.0, 2.0), |x| {
            x[0].rsub_scalar(2.0)
        }),
        ("rdiv_scalar", smooth(&mut r, &[2, 3], 0.5, 2.0), |x| {
            x[0].rdiv_scalar(2.0)
        }),
        ("maximum_scalar", off_zero(&mut r, &[2, 3]), |x| {
            x[0].maximum_scalar(0.0)
        }),
        ("minimum_scalar", off_zero(&mut r, &[2, 3]), |x| {
            x[0].minimum_scalar(0.0)
        }),
    ];
    for (name, inp, f) in cases {
        check(name, vec![inp], &f);
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    let mut r = Rng::new(2);
    let cases: Vec<(&str, [Input; 2], F)> = vec![
        (
            "add",
            [
                smooth(&mut r, &[2, 3], -2.0, 2.0),
                smooth(&mut r, &[3], -2.0, 2.0),
            ],
            |x| x[0].add(&x[1]),
        ),
        (
            "sub",
            [
                smooth(&mut r, &[2, 1], -2.0, 2.0),
                smooth(&mut r, &[1, 3], -2.0, 2.0),
            ],
            |x| x[0].sub(&x[1]),
        ),
        (
            "mul",
            [
                smooth(&mut r, &[2, 3], -2.0, 2.0),
                smooth(&mut r, &[2, 1], -2.0, 2.0),
            ],
            |x| x[0].mul(&x[1]),
        ),
        (
            "div",
            [
                smooth(&mut r, &[2, 3], -2.0, 2.0),
                smooth(&mut r, &[3], 0.5, 2.0),
            ],
            |x| x[0].div(&x[1]),
        ),
        (
            "pow",
            [
                smooth(&mut r, &[2, 3], 0.5, 2.0),
                smooth(&mut r, &[3], -1.5, 1.5),
            ],
            |x| x[0].pow(&x[1]),
        ),
        (
            "maximum",
            [spaced(&mut r, &[2, 3]), spaced(&mut r, &[2, 3])],
            |x| x[0].maximum(&x[1].add_scalar(0.1)?),
        ),
        (
            "minimum",
            [spaced(&mut r, &[2, 3]), spaced(&mut r, &[3])],
            |x| x[0].minimum(&x[1].add_scalar(0.1)?),
        ),
    ];
    for (name, [a, b], f) in cases {
        check(name, vec![a, b], &f);
    }
    let cond = constant(&[2, 3], vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
    check(
        "where",
        vec![
            cond,
            smooth(&mut r, &[2, 3], -1.0, 1.0),
            smooth(&mut r, &[3], -1.0, 1.0),
        ],
        &|x| x[0].where_cond(&x[1], &x[2]),
    );
}

#[test]
fn reductions_and_softmax() {
    let mut r = Rng::new(3);
    let cases: Vec<(&str, Input, F)> = vec![
        ("sum", smooth(&mut r, &[2, 3, 2], -1.0, 1.0), |x| {
            x[0].sum(&[1], false)
        }),
        ("sum_all", smooth(&mut r, &[2, 3], -1.0, 1.0), |x| {
            x[0].sum_all()
        }),
        ("mean", smooth(&mut r, &[2, 3, 2], -1.0, 1.0), |x| {
            x[0].mean(&[0, 2], true)
        }),
        ("max", spaced(&mut r, &[2, 4]), |x| x[0].max(&[1], false)),
        ("min", spaced(&mut r, &[3, 2]), |x| x[0].min(&[0], true)),
        ("max_all", spaced(&mut r, &[2, 3]), |x| x[0].max(&[], false)),
        ("var", smooth(&mut r, &[2, 4], -1.0, 1.0), |x| {
            x[0].var(&[1], false, 1)
        }),
        ("var_biased", smooth(&mut r, &[3, 2], -1.0, 1.0), |x| {
            x[0].var(&[], false, 0)
        }),
        ("std", smooth(&mut r, &[2, 4], -1.0, 1.0), |x| {
            x[0].std(&[1], false, 1)
        }),
        ("softmax", smooth(&mut r, &[2, 4], -2.0, 2.0), |x| {
            x[0].softmax(-1)
        }),
        ("softmax_axis0", smooth(&mut r, &[3, 2], -2.0, 2.0), |x| {
            x[0].softmax(0)
        }),
        ("log_softmax", smooth(&mut r, &[2, 4], -2.0, 2.0), |x| {
            x[0].log_softmax(1)
        }),
    ];
    for (name, inp, f) in cases {
        check(name, vec![inp], &f);
    }
}

#[test]
fn matmul_variants() {
    let mut r = Rng::new(4);
    let cases: Vec<(&str, [Input; 2], F)> = vec![
        (
            "matmul",
            [
                smooth(&mut r, &[2, 3], -1.0, 1.0),
                smooth(&mut r, &[3, 2], -1.0, 1.0),
            ],
            |x| x[0].matmul(&x[1]),
        ),
        (
            "matmul_batched_broadcast",
            [
                smooth(&mut r, &[2, 2, 3], -1.0, 1.0),
                smooth(&mut r, &[3, 2], -1.0, 1.0),
            ],
            |x| x[0].matmul(&x[1]),
        ),
        (
            "matmul_transposed",
            [
                smooth(&mut r, &[3, 2], -1.0, 1.0),
                smooth(&mut r, &[2, 3], -1.0, 1.0),
            ],
            |x| x[0].t()?.matmul(&x[1].t()?),
        ),
        (
            "matmul_vectors",
            [
                smooth(&mut r, &[3], -1.0, 1.0),
                smooth(&mut r, &[3, 2], -1.0, 1.0),
            ],
            |x| x[0].matmul(&x[1]),
        ),
        (
            "dot",
            [
                smooth(&mut r, &[4], -1.0, 1.0),
                smooth(&mut r, &[4], -1.0, 1.0),
            ],
            |x| x[0].matmul(&x[1]),
        ),
    ];
    for (name, [a, b], f) in cases {
        check(name, vec![a, b], &f);
    }
}

#[test]
fn views_joins_and_indexing() {
    let mut r = Rng::new(5);
    let cases: Vec<(&str, Input, F)> = vec![
        ("reshape", smooth(&mut r, &[2, 3], -1.0, 1.0), |x| {
            x[0].reshape(&[3, 2])?.mul_scalar(1.5)
        }),
        ("permute", smooth(&mut r, &[2, 3, 2], -1.0, 1.0), |x| {
            x[0].permute(&[2, 0, 1])
        }),
        (
            "transpose_contiguous",
            smooth(&mut r, &[2, 3], -1.0, 1.0),
            |x| x[0].t()?.contiguous(),
        ),
        ("expand", smooth(&mut r, &[3, 1], -1.0, 1.0), |x| {
            x[0].expand(&[2, 3, 2])
        }),
        ("narrow", smooth(&mut r, &[3, 4], -1.0, 1.0), |x| {
            x[0].narrow(1, 1, 2)
        }),
        (
            "squeeze_unsqueeze",
            smooth(&mut r, &[3, 1], -1.0, 1.0),
            |x| x[0].squeeze(None)?.unsqueeze(0),
        ),
        ("flatten", smooth(&mut r, &[2, 2, 2], -1.0, 1.0), |x| {
            x[0].flatten(1, 2)
        }),
        ("stack_self", smooth(&mut r, &[2, 2], -1.0, 1.0), |x| {
            Tensor::stack(&[&x[0], &x[0].exp()?], 1)
        }),
    ];
    for (name, inp, f) in cases {
        check(name, vec![inp], &f);
    }
    check(
        "concat",
        vec![
            smooth(&mut r, &[2, 3], -1.0, 1.0),
            smooth(&mut r, &[1, 3], -1.0, 1.0),
        ],
        &|x| Tensor::concat(&[&x[0], &x[1]], 0),
    );
    let idx = constant(&[4], vec![2.0, 0.0, 2.0, 1.0]);
    check(
        "index_select",
        vec![smooth(&mut r, &[3, 2], -1.0, 1.0), idx],
        &|x| x[0].index_select(0, &x[1]),
    );
    let gidx = constant(&[2, 2], vec![2.0, 0.0, 1.0, 1.0]);
    check(
        "gather",
        vec![smooth(&mut r, &[2, 3], -1.0, 1.0), gidx],
        &|x| x[0].gather(1, &x[1]),
    );
    let small = constant(&[1, 2], vec![1.0, 0.0]);
    check(
        "gather_smaller_index",
        vec![smooth(&mut r, &[3, 2], -1.0, 1.0), small],
        &|x| x[0].gather(0, &x[1]),
    );
}

#[test]
fn losses() {
    let mut r = Rng::new(6);
    let targets = constant(&[4], vec![2.0, 0.0, 1.0, 2.0]);
    let logits = || smooth(&mut Rng::new(60), &[4, 3], -2.0, 2.0);
    check("cross_entropy", vec![logits(), targets], &|x| {
        loss::cross_entropy(&x[0], &x[1], &Default::default())
    });
    let targets = constant(&[4], vec![2.0, 0.0, 1.0, 2.0]);
    let opts = CrossEntropyOptions {
        reduction: Reduction::Sum,
        label_smoothing: 0.1,
        ignore_index: Some(0),
    };
    check(
        "cross_entropy_smooth_ignore",
        vec![logits(), targets],
        &move |x| loss::cross_entropy(&x[0], &x[1], &opts),
    );
    let targets = constant(&[4], vec![2.0, 0.0, 1.0, 2.0]);
    check(
        "nll",
        vec![smooth(&mut r, &[4, 3], -2.0, -0.1), targets],
        &|x| loss::nll_loss(&x[0], &x[1], Reduction::Mean, None),
    );
    check(
        "mse",
        vec![
            smooth(&mut r, &[2, 3], -1.0, 1.0),
            smooth(&mut r, &[2, 3], -1.0, 1.0),
        ],
        &|x| loss::mse_loss(&x[0], &x[1], Reduction::Mean),
    );
    let t = smooth(&mut r, &[5], 0.1, 0.9);
    check(
        "bce_with_logits",
        vec![smooth(&mut r, &[5], -3.0, 3.0), t],
        &|x| loss::binary_cross_entropy_with_logits(&x[0], &x[1], Reduction::Sum),
    );
}
