//! Misuse and hostile input, one reproducer per class of failure: each is an `Err` (or the
//! correct result), never a panic, an abort or a silently wrong value.

mod common;

use common::*;
use kiln::infer::freeze;
use kiln::nn::{Init, Linear, Module, Sequential};
use kiln::optim::{Optimizer, Sgd, SgdOptions};
use kiln::Tensor;

fn err_of<T>(r: kiln::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an Err"),
        Err(e) => e.to_string(),
    }
}

/// Zero strides and groups, huge dilations and empty pooling outputs from a spec string are
/// an `Err` when built or run, the same as through the tensor ops.
#[test]
fn spec_geometry_is_checked_like_the_ops() {
    let d = dev();
    let x = Tensor::randn(&[1, 1, 6, 6], 0, &d).unwrap();
    for spec in [
        "conv2d(1,4,3,s=0)",
        "conv2d(1,4,3,g=0)",
        "conv2d(1,4,3,d=0)",
        "conv2d(1,4,3,d=9223372036854775808)",
        "conv2d(1,4,3,p=9223372036854775808)",
        "adaptive_avgpool2d(0,0)",
        "maxpool2d(2,s=0)",
        "basicblock(1,4,s=0)",
    ] {
        let r = Sequential::from_spec(&mut Init::new(&d, 0), spec).and_then(|m| {
            let y = kiln::no_grad(|| m.forward(&x))?;
            y.to_vec()
        });
        assert!(r.is_err(), "{spec} gave {r:?}");
    }
}

/// Sizes whose product overflows are an `Err`, not a tensor that claims zero elements.
#[test]
fn size_overflow_is_err() {
    let d = dev();
    let x = Tensor::ones(&[1, 1], &d).unwrap();
    let e = err_of(x.expand(&[1 << 32, 1 << 32]));
    assert!(e.contains("expand"), "{e}");
    let e = err_of(x.expand(&[usize::MAX, 2]));
    assert!(e.contains("expand"), "{e}");
}

/// Dropping a deep autograd graph does not overflow the stack: 100k chained views on a
/// thread with a small stack, and 40k accumulated losses on a worker thread.
#[test]
fn deep_graphs_drop_without_overflow() {
    let d = dev();
    let chain = {
        let d = d.clone();
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let mut t = Tensor::ones(&[2, 3], &d).unwrap().requires_grad();
                for i in 0..100_000 {
                    t = if i % 2 == 0 {
                        t.reshape(&[3, 2])
                    } else {
                        t.reshape(&[2, 3])
                    }
                    .unwrap();
                }
                drop(t);
            })
            .unwrap()
    };
    chain.join().expect("the chain of views drops");
    let sum = {
        let d = d.clone();
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let w = Tensor::ones(&[1], &d).unwrap().requires_grad();
                let mut loss = w.mul_scalar(0.0).unwrap();
                for _ in 0..40_000 {
                    loss = loss.add(&w).unwrap();
                }
                drop(loss);
            })
            .unwrap()
    };
    sum.join().expect("the accumulated loss drops");
}

/// Gradients and optimizer state from another device are refused.
#[test]
fn tensors_of_another_device_are_refused() {
    let d = dev();
    let other = own_device();
    let w = Tensor::ones(&[3], &d).unwrap().requires_grad();
    let e = err_of(w.set_grad(Some(Tensor::ones(&[3], &other).unwrap())));
    assert!(e.contains("device"), "{e}");
    let mut opt = Sgd::new(
        vec![w.clone()],
        SgdOptions {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    w.set_grad(Some(Tensor::ones(&[3], &d).unwrap())).unwrap();
    opt.step().unwrap();
    let (name, _) = opt.state().into_iter().next().expect("momentum state");
    let e = err_of(opt.set_state(&name, &Tensor::ones(&[3], &other).unwrap()));
    assert!(e.contains("device"), "{e}");
}

/// `checkpoint::load` is all-or-nothing: a bad optimizer section leaves the model as it was.
#[test]
fn checkpoint_load_writes_nothing_on_error() {
    let d = dev();
    let path = std::env::temp_dir().join(format!("kiln-misuse-{}.safetensors", std::process::id()));
    let model = Linear::new(&mut Init::new(&d, 1), 3, 2, true).unwrap();
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    for p in model.parameters() {
        p.set_grad(Some(Tensor::ones(p.dims(), &d).unwrap()))
            .unwrap();
    }
    opt.step().unwrap();
    kiln::checkpoint::save(&path, &model, Some(&opt), None).unwrap();
    // Another model and an optimizer whose state cannot take the file's (other parameters).
    let target = Linear::new(&mut Init::new(&d, 2), 3, 2, true).unwrap();
    let before: Vec<Vec<f32>> = target
        .parameters()
        .iter()
        .map(|p| p.to_vec().unwrap())
        .collect();
    let stranger = Tensor::ones(&[5], &d).unwrap().requires_grad();
    let mut wrong = Sgd::new(
        vec![stranger],
        SgdOptions {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    let r = kiln::checkpoint::load(&path, &target, Some(&mut wrong));
    std::fs::remove_file(&path).ok();
    assert!(r.is_err(), "the optimizer section does not fit");
    let after: Vec<Vec<f32>> = target
        .parameters()
        .iter()
        .map(|p| p.to_vec().unwrap())
        .collect();
    assert_eq!(before, after, "the model was written before the error");
}

/// Degenerate sizes give PyTorch's values: a matmul over k = 0 is zeros, a frozen
/// `Linear(0 -> 1)` returns its bias, the sum of no elements is 0.
#[test]
fn degenerate_sizes() {
    let d = dev();
    let a = Tensor::ones(&[2, 0], &d).unwrap();
    let b = Tensor::ones(&[0, 3], &d).unwrap();
    // Fill the pool with non-zero buffers of the output's size class first.
    drop(Tensor::full(&[2, 3], 7.0, &d).unwrap().to_vec().unwrap());
    assert_eq!(a.matmul(&b).unwrap().to_vec().unwrap(), vec![0.0; 6]);
    assert_eq!(a.sum_all().unwrap().to_vec().unwrap(), vec![0.0]);
    assert_eq!(
        a.sum(&[1], false).unwrap().to_vec().unwrap(),
        vec![0.0, 0.0]
    );
    let lin = Linear::new(&mut Init::new(&d, 3), 0, 1, true).unwrap();
    let bias = lin.bias.as_ref().unwrap().to_vec().unwrap();
    let x = Tensor::ones(&[4, 0], &d).unwrap();
    let eval = kiln::no_grad(|| lin.forward(&x)).unwrap().to_vec().unwrap();
    assert_eq!(eval, vec![bias[0]; 4]);
    let frozen = freeze(lin, &x).unwrap();
    assert_eq!(
        frozen.predict(&x).unwrap().to_vec().unwrap(),
        vec![bias[0]; 4]
    );
}

/// A frozen model serving 100 batch sizes keeps its plan cache bounded and its GPU memory
/// flat: after every call, only the weights stay live.
#[test]
fn many_batch_sizes_keep_memory_flat() {
    let d = own_device();
    let spec = "linear(6,16) relu linear(16,3)";
    let model = Sequential::from_spec(&mut Init::new(&d, 4), spec).unwrap();
    let frozen = freeze(model, &Tensor::ones(&[2, 6], &d).unwrap()).unwrap();
    d.synchronize().unwrap();
    let weights = d.live_bytes();
    for n in 1..=100 {
        let y = frozen.predict(&Tensor::ones(&[n, 6], &d).unwrap()).unwrap();
        assert_eq!(y.dims(), &[n, 3]);
        drop(y);
        d.synchronize().unwrap();
        assert_eq!(d.live_bytes(), weights, "batch {n}");
        assert!(frozen.plan_cache_bytes() <= kiln::infer::PLAN_CACHE_BYTES);
    }
    assert!(frozen.plan_cache_bytes() > 0);
}
