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

/// `checkpoint::load` is all-or-nothing: a bad optimizer file leaves the model as it was.
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
    std::fs::remove_file(kiln::checkpoint::optimizer_path(&path)).ok();
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

/// A lost device makes every later call an `Err(DeviceLost)`: no panic, no hang.
#[test]
fn device_loss_is_err_from_the_next_call() {
    let d = own_device();
    let model = Sequential::from_spec(&mut Init::new(&d, 5), "linear(4,3) relu").unwrap();
    let x = Tensor::ones(&[2, 4], &d).unwrap();
    let frozen = freeze(
        Sequential::from_spec(&mut Init::new(&d, 6), "linear(4,2)").unwrap(),
        &x,
    )
    .unwrap();
    let y = model.forward(&x).unwrap();
    d.destroy();
    let lost = |r: kiln::Result<Vec<f32>>| matches!(r, Err(kiln::Error::DeviceLost { .. }));
    assert!(lost(y.to_vec()), "readback");
    assert!(lost(model.forward(&x).and_then(|t| t.to_vec())), "forward");
    assert!(
        lost(Tensor::ones(&[2], &d).and_then(|t| t.to_vec())),
        "allocation"
    );
    assert!(
        lost(frozen.predict(&x).and_then(|t| t.to_vec())),
        "frozen inference"
    );
    assert!(matches!(
        d.synchronize(),
        Err(kiln::Error::DeviceLost { .. })
    ));
    let loss = y.sum_all().and_then(|l| l.backward());
    assert!(
        matches!(loss, Err(kiln::Error::DeviceLost { .. })),
        "{loss:?}"
    );
    drop((y, x, model, frozen));
}

/// NaN propagates as in PyTorch, whatever the driver assumes about NaN: activations of NaN
/// are NaN (also in fused epilogues), comparisons with NaN are false except `!=`, and
/// training on NaN features stops with an error instead of reporting a finite loss.
#[test]
fn nan_propagates() {
    let d = dev();
    let x = Tensor::from_slice(&[f32::NAN, 1.0, -2.0], &[3], &d).unwrap();
    for (name, y) in [
        ("relu", x.relu()),
        ("tanh", x.tanh()),
        ("sigmoid", x.sigmoid()),
        ("gelu", x.gelu()),
        ("silu", x.silu()),
        ("leaky_relu", x.leaky_relu(0.1)),
        ("abs", x.abs()),
        ("exp", x.exp()),
        ("clamp", x.clamp(0.0, 1.0)),
    ] {
        let v = y.unwrap().to_vec().unwrap();
        assert!(v[0].is_nan() && !v[1].is_nan(), "{name}: {v:?}");
    }
    let nan = Tensor::full(&[3], f32::NAN, &d).unwrap();
    let cmp =
        |op: fn(&Tensor, &Tensor) -> kiln::Result<Tensor>| op(&x, &nan).unwrap().to_vec().unwrap();
    assert_eq!(cmp(Tensor::eq), vec![0.0; 3]);
    assert_eq!(cmp(Tensor::ne), vec![1.0; 3]);
    assert_eq!(cmp(Tensor::lt), vec![0.0; 3]);
    assert_eq!(cmp(Tensor::ge), vec![0.0; 3]);
    // A linear layer with a fused ReLU, frozen, on a NaN input.
    let net = Sequential::from_spec(&mut Init::new(&d, 8), "linear(3,2) relu").unwrap();
    let xs = Tensor::from_slice(&[f32::NAN, 0.0, 0.0], &[1, 3], &d).unwrap();
    let frozen = freeze(net, &xs).unwrap();
    assert!(frozen
        .predict(&xs)
        .unwrap()
        .to_vec()
        .unwrap()
        .iter()
        .all(|v| v.is_nan()));
    // fit on all-NaN features with a ReLU model.
    use kiln::data::{DataLoader, InMemoryDataset};
    let data = InMemoryDataset::new(
        vec![f32::NAN; 16 * 3],
        (0..16).map(|i| i % 2).collect(),
        &[3],
        2,
    )
    .unwrap();
    let mut model =
        Sequential::from_spec(&mut Init::new(&d, 9), "linear(3,4) relu linear(4,2)").unwrap();
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let loader = DataLoader::new(&data, 8, &d);
    let r = kiln::train::fit(&mut model, &mut opt, &loader, None, Default::default());
    assert!(
        r.is_err(),
        "fit on NaN features gave {:?}",
        r.map(|v| v.len())
    );
}

/// Writing in place to a tensor the forward saved (assign, an optimizer step) makes the
/// next backward through it an `Err`, as PyTorch's version counters do.
#[test]
fn in_place_writes_between_forward_and_backward_are_err() {
    let d = dev();
    let w = Tensor::from_slice(&[1.0, 2.0, 3.0], &[3], &d)
        .unwrap()
        .requires_grad();
    let x = Tensor::from_slice(&[4.0, 5.0, 6.0], &[3], &d).unwrap();
    // assign
    let loss = x.mul(&w).unwrap().mul(&w).unwrap().sum_all().unwrap();
    w.assign(&Tensor::zeros(&[3], &d).unwrap()).unwrap();
    let e = err_of(loss.backward());
    assert!(e.contains("modified in place"), "{e}");
    // an optimizer step between a forward and its backward
    let mut opt = Sgd::new(
        vec![w.clone()],
        SgdOptions {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let first = x.mul(&w).unwrap().mul(&w).unwrap().sum_all().unwrap();
    let second = x.mul(&w).unwrap().mul(&w).unwrap().sum_all().unwrap();
    first.backward().unwrap();
    opt.step().unwrap();
    let e = err_of(second.backward());
    assert!(e.contains("modified in place"), "{e}");
    // The usual loop is unaffected: forward, backward, step, again.
    for _ in 0..3 {
        opt.zero_grad();
        x.mul(&w)
            .unwrap()
            .mul(&w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step().unwrap();
    }
}

/// Indices must be integers in range: 1.5 or 7 for an axis of 4 makes the next readback an
/// `Err` (the kernel records the fault), not a silent 1 or a zero row; reads after it work.
#[test]
fn bad_indices_are_err_at_the_next_readback() {
    let d = own_device();
    let x = Tensor::randn(&[4, 3], 0, &d).unwrap();
    for (bad, what) in [(1.5f32, "1.5"), (7.0, "7"), (-1.0, "-1"), (f32::NAN, "NaN")] {
        let idx = Tensor::from_slice(&[0.0, bad], &[2], &d).unwrap();
        let e = err_of(x.index_select(0, &idx).and_then(|t| t.to_vec()));
        assert!(e.contains(what) && e.contains("index"), "{e}");
        let gidx = Tensor::from_slice(&[0.0, bad, 1.0], &[1, 3], &d).unwrap();
        let e = err_of(x.gather(0, &gidx).and_then(|t| t.to_vec()));
        assert!(e.contains(what), "{e}");
        // The fault was reported once: good indices read back as usual.
        let good = Tensor::from_slice(&[3.0, 1.0], &[2], &d).unwrap();
        let want: Vec<f32> = x.to_vec().unwrap()[9..12]
            .iter()
            .chain(&x.to_vec().unwrap()[3..6])
            .copied()
            .collect();
        assert_eq!(x.index_select(0, &good).unwrap().to_vec().unwrap(), want);
    }
}
