//! Ops on contiguous views that start past the beginning of their storage (a narrow along
//! the first axis, a chunk): each gives what it gives on a fresh copy of the same values.

mod common;

use common::*;
use kiln::{Conv2dOptions, Pool2dOptions, Tensor};

#[test]
fn contiguous_views_with_an_offset_read_their_own_elements() {
    let d = dev();
    let big = Tensor::randn(&[3, 2, 5, 5], 1, &d).unwrap();
    let view = big.narrow(0, 1, 2).unwrap();
    let copy = Tensor::from_slice(&view.to_vec().unwrap(), view.dims(), &d).unwrap();
    let w = Tensor::randn(&[3, 2, 3, 3], 2, &d).unwrap();
    let opts = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    type Op<'a> = Box<dyn Fn(&Tensor) -> kiln::Result<Tensor> + 'a>;
    let ops: Vec<(&str, Op<'_>)> = vec![
        ("conv2d", Box::new(|x| x.conv2d(&w, None, &opts))),
        (
            "max_pool2d",
            Box::new(|x| x.max_pool2d(&Pool2dOptions::new([2, 2]))),
        ),
        (
            "avg_pool2d",
            Box::new(|x| x.avg_pool2d(&Pool2dOptions::new([2, 2]))),
        ),
        (
            "adaptive_avg_pool2d",
            Box::new(|x| x.adaptive_avg_pool2d([2, 3])),
        ),
        ("softmax", Box::new(|x| x.softmax(-1))),
        ("sum", Box::new(|x| x.sum(&[1, 3], false))),
        (
            "layer_norm",
            Box::new(|x| x.layer_norm(&[5], None, None, 1e-5)),
        ),
        (
            "group_norm",
            Box::new(|x| x.group_norm(2, None, None, 1e-5)),
        ),
        ("matmul", Box::new(|x| x.matmul(&x.transpose(-1, -2)?))),
        ("relu", Box::new(|x| x.relu())),
        (
            "conv_transpose2d",
            Box::new(|x| {
                x.conv_transpose2d(
                    &w.permute(&[1, 0, 2, 3])?.contiguous()?,
                    None,
                    &Default::default(),
                )
            }),
        ),
    ];
    let mut bad = Vec::new();
    for (name, f) in &ops {
        let (a, b) = (
            f(&view).unwrap().to_vec().unwrap(),
            f(&copy).unwrap().to_vec().unwrap(),
        );
        if a.iter()
            .zip(&b)
            .any(|(p, q)| (p - q).abs() > 1e-5 * (1.0 + q.abs()))
        {
            bad.push(*name);
        }
    }
    assert!(bad.is_empty(), "wrong on an offset view: {bad:?}");
}
