//! Capture of any model's forward pass: four models (the digits CNN, a ResNet-style net, a
//! pre-LN transformer block and a module kiln does not know) are frozen, saved, loaded from
//! the file alone on a fresh device, and compared with their eval-mode outputs at two batch
//! sizes. Then the memory plan of the ResNet and capture errors (the file fuzz is in
//! `fuzz_artifact.rs`).

mod common;

use common::models::*;
use common::*;
use kiln::infer::{freeze, freeze_fn, InferenceModel};
use kiln::nn::{BatchNorm, Init, Module, Sequential};
use kiln::{Device, Result, Tensor};

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A module kiln has never seen: a gated unit on raw tensors, with concat and narrow.
struct Gated {
    w1: Tensor,
    w2: Tensor,
    scale: Tensor,
}

impl Module for Gated {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = x.matmul(&self.w1)?;
        let g = x.matmul(&self.w2.t()?)?.sigmoid()?;
        let y = a.mul(&g)?.mul(&self.scale)?;
        let z = Tensor::concat(&[&y, &x.narrow(1, 1, 3)?], 1)?;
        z.tanh()?.sub(&z.mean(&[-1], true)?)
    }

    fn describe(&self) -> String {
        "Gated".into()
    }
}

/// Eval outputs at two batch sizes, frozen on a third; the file loaded on a fresh device gives
/// the same outputs.
fn check<M: Module>(name: &str, mut model: M, input: impl Fn(usize, u64, &Device) -> Tensor) {
    let d = dev();
    model.set_training(false);
    let sizes = [3usize, 6];
    let xs: Vec<Tensor> = sizes.iter().map(|&n| input(n, n as u64, &d)).collect();
    let want: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| {
            kiln::no_grad(|| model.forward(x))
                .unwrap()
                .to_vec()
                .unwrap()
        })
        .collect();
    let frozen = freeze(model, &input(4, 99, &d)).unwrap();
    let path = std::env::temp_dir().join(format!(
        "kiln-capture-{name}-{}.safetensors",
        std::process::id()
    ));
    frozen.save(&path).unwrap();
    drop(frozen);
    let fresh = own_device();
    let loaded = InferenceModel::load(&path, &fresh).unwrap();
    std::fs::remove_file(&path).ok();
    for (x, w) in xs.iter().zip(&want) {
        let xf = Tensor::from_slice(&x.to_vec().unwrap(), x.dims(), &fresh).unwrap();
        let got = loaded.predict(&xf).unwrap().to_vec().unwrap();
        let diff = max_rel_diff(&got, w);
        assert!(
            diff <= 1e-4,
            "{name} at batch {}: relative difference {diff}\n{}",
            x.dims()[0],
            loaded.describe()
        );
    }
    check_half(name, loaded, &xs, &want);
}

/// Where the adapter has f16, the graph converts (every op, with casts around those without a
/// half kernel), survives a save and load, and stays within f16 rounding of the f32 outputs.
fn check_half(name: &str, model: InferenceModel, xs: &[Tensor], want: &[Vec<f32>]) {
    let d = model.device().clone();
    // Without SHADER_F16, to_half_or_refused has asserted the documented Err.
    let Some(half) = to_half_or_refused(model) else {
        return;
    };
    let half = InferenceModel::from_bytes(&half.to_bytes().unwrap(), &d).unwrap();
    assert_eq!(half.precision(), kiln::infer::Precision::F16);
    for (x, w) in xs.iter().zip(want) {
        let xf = Tensor::from_slice(&x.to_vec().unwrap(), x.dims(), &d).unwrap();
        let got = half.predict(&xf).unwrap().to_vec().unwrap();
        let diff = max_rel_diff(&got, w);
        assert!(
            diff <= 5e-3,
            "{name} in f16: relative difference {diff}\n{}",
            half.describe()
        );
    }
}

#[test]
fn digits_cnn_round_trips() {
    let d = dev();
    let model = Sequential::from_spec(&mut Init::new(&d, 1), DIGITS_CNN).unwrap();
    check("digits", model, images);
}

#[test]
fn resnet_round_trips_with_folded_batch_norms() {
    let d = dev();
    check("resnet", resnet(&d), images);
    let frozen = freeze(resnet(&d), &images(2, 1, &d)).unwrap();
    let g = frozen.describe();
    assert!(
        !g.contains("batch_norm"),
        "every batch norm folds into its conv:\n{g}"
    );
    // stem (relu fused), 2 convs per block, 1 shortcut, 3 adds each with its relu, pooling,
    // flatten, head.
    assert_eq!(frozen.node_count(), 1 + 6 + 1 + 3 * 2 + 1 + 1 + 1, "{g}");
}

#[test]
fn transformer_block_round_trips() {
    let d = dev();
    check("transformer", block(&d), tokens);
    // Every linear's bias is fused (along the last axis of (N, T, C)), and so is the MLP's
    // GELU: no add of a constant is left.
    let frozen = freeze(block(&d), &tokens(2, 1, &d)).unwrap();
    let g = frozen.describe();
    assert!(!g.contains("Unary { op: Gelu"), "{g}");
    assert!(
        !g.lines()
            .any(|l| l.contains("binary[") && l.contains("Const(")),
        "{g}"
    );
}

#[test]
fn user_module_round_trips() {
    let d = dev();
    let r = |s: &[usize], seed| Tensor::randn(s, seed, &d).unwrap();
    let model = Gated {
        w1: r(&[6, 4], 1),
        w2: r(&[4, 6], 2),
        scale: r(&[4], 3),
    };
    check("gated", model, |n, seed, d| {
        Tensor::randn(&[n, 6], seed, d).unwrap()
    });
}

#[test]
fn transposed_conv_and_group_norm_round_trip() {
    // A decoder-like module: transposed convolution, group norm, SiLU, average pooling.
    struct Up {
        up: kiln::nn::ConvTranspose2d,
        gamma: Tensor,
        beta: Tensor,
    }
    impl Module for Up {
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            let y = self.up.forward(x)?;
            let y = y
                .group_norm(2, Some(&self.gamma), Some(&self.beta), 1e-5)?
                .silu()?;
            y.avg_pool2d(&kiln::Pool2dOptions::new([2, 2]))?
                .add(&y.narrow(2, 0, 3)?.narrow(3, 0, 3)?)
        }
        fn describe(&self) -> String {
            "Up".into()
        }
    }
    let d = dev();
    let mut init = Init::new(&d, 4);
    let opts = kiln::ConvTranspose2dOptions {
        stride: [2, 2],
        padding: [1, 1],
        output_padding: [1, 1],
        ..Default::default()
    };
    let model = Up {
        up: kiln::nn::ConvTranspose2d::new(&mut init, 3, 4, [3, 3], opts, true).unwrap(),
        gamma: Tensor::randn(&[4], 5, &d).unwrap(),
        beta: Tensor::randn(&[4], 6, &d).unwrap(),
    };
    check("decoder", model, |n, seed, d| {
        Tensor::randn(&[n, 3, 3, 3], seed, d).unwrap()
    });
}

#[test]
fn closures_with_several_inputs_and_outputs() {
    let d = dev();
    let model = block(&d);
    let mask = causal_mask(&d);
    let want: Vec<f32> = kiln::no_grad(|| model.run(&tokens(3, 5, &d), &mask))
        .unwrap()
        .to_vec()
        .unwrap();
    let frozen = freeze_fn(&[tokens(2, 1, &d), mask.clone()], &[Some(0), None], |t| {
        let y = model.run(&t[0], &t[1])?;
        Ok(vec![y.clone(), y.sum(&[-1], false)?])
    })
    .unwrap();
    let out = frozen.run(&[&tokens(3, 5, &d), &mask]).unwrap();
    assert_eq!(out.len(), 2);
    assert!(max_rel_diff(&out[0].to_vec().unwrap(), &want) <= 1e-4);
    assert_eq!(out[1].dims(), &[3, T]);
    // Another mask is an input, not a constant: a full mask changes the result.
    let ones = Tensor::ones(&[T, T], &d).unwrap();
    let other = frozen.run(&[&tokens(3, 5, &d), &ones]).unwrap();
    let full: Vec<f32> = kiln::no_grad(|| model.run(&tokens(3, 5, &d), &ones))
        .unwrap()
        .to_vec()
        .unwrap();
    assert!(max_rel_diff(&other[0].to_vec().unwrap(), &full) <= 1e-4);
    assert!(max_rel_diff(&full, &want) > 1e-3);
}

#[test]
fn uncapturable_ops_are_errors() {
    let d = dev();
    let x = Tensor::randn(&[2, 3], 0, &d).unwrap();
    let e = freeze_fn(std::slice::from_ref(&x), &[Some(0)], |t| {
        Ok(vec![t[0].add(&Tensor::rand(&[3], 0, t[0].device())?)?])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("rand") && e.contains("cannot be captured"),
        "{e}"
    );
    let e = freeze_fn(std::slice::from_ref(&x), &[Some(0)], |t| {
        Ok(vec![t[0].dropout(0.5, 1, true)?])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("dropout"), "{e}");
    let mut bn = BatchNorm::new_1d(&mut Init::new(&d, 0), 3).unwrap();
    bn.set_training(true);
    let e = freeze_fn(std::slice::from_ref(&x), &[Some(0)], |t| {
        Ok(vec![bn.forward(&t[0])?])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("batch_norm"), "{e}");
    // Control flow on the batch size records another graph at another size.
    let e = freeze_fn(std::slice::from_ref(&x), &[Some(0)], |t| {
        Ok(vec![if t[0].dims()[0] % 2 == 0 {
            t[0].relu()?
        } else {
            t[0].exp()?
        }])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("different graph"), "{e}");
    // A constant made in the forward whose shape follows the batch.
    let e = freeze_fn(std::slice::from_ref(&x), &[Some(0)], |t| {
        let n = t[0].dims()[0];
        let c = Tensor::from_slice(&vec![1.0; n * 3], &[n, 3], t[0].device())?;
        Ok(vec![t[0].add(&c)?])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("batch size"), "{e}");
    // Values read to the host during capture would be frozen: a length taken from a mask.
    let mask = Tensor::from_slice(&[1.0, 1.0, 0.0], &[3], &d).unwrap();
    let e = freeze_fn(&[x.clone(), mask], &[Some(0), None], |t| {
        let n = t[1].sum(&[0], false)?.to_scalar()? as usize;
        Ok(vec![t[0].narrow(1, 0, n)?])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("to_vec") && e.contains("frozen"), "{e}");
    // One tensor passed as two inputs would make them one input of the graph.
    let e = freeze_fn(&[x.clone(), x.clone()], &[None, None], |t| {
        Ok(vec![t[0].sub(&t[1])?])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("same tensor"), "{e}");
}

#[test]
fn frozen_weights_are_a_copy_and_infinities_survive_the_file() {
    let d = dev();
    let w = Tensor::randn(&[3, 4], 1, &d).unwrap();
    let x = Tensor::randn(&[2, 3], 2, &d).unwrap();
    // clamp(0, inf) and a -inf fill whose shape follows the batch: non-finite attributes.
    let frozen = freeze_fn(std::slice::from_ref(&x), &[Some(0)], |t| {
        let y = t[0].matmul(&w)?.clamp(0.0, f32::INFINITY)?;
        let n = t[0].dims()[0];
        let floor = Tensor::full(&[n, 4], f32::NEG_INFINITY, t[0].device())?;
        Ok(vec![y.maximum(&floor)?])
    })
    .unwrap();
    let want = kiln::no_grad(|| x.matmul(&w)?.relu())
        .unwrap()
        .to_vec()
        .unwrap();
    // The weights change after freezing; the frozen model keeps the old ones.
    w.assign(&Tensor::zeros(&[3, 4], &d).unwrap()).unwrap();
    let loaded = InferenceModel::from_bytes(&frozen.to_bytes().unwrap(), &d).unwrap();
    for m in [&frozen, &loaded] {
        assert_eq!(m.predict(&x).unwrap().to_vec().unwrap(), want);
    }
}

#[test]
fn unbatched_pooling_converts_to_half() {
    let d = dev();
    let x = Tensor::randn(&[4, 8, 8], 3, &d).unwrap();
    let frozen = freeze_fn(std::slice::from_ref(&x), &[None], |t| {
        let p = t[0].max_pool2d(&kiln::Pool2dOptions::new([2, 2]))?;
        Ok(vec![p.adaptive_avg_pool2d([2, 2])?])
    })
    .unwrap();
    let want = frozen.predict(&x).unwrap().to_vec().unwrap();
    let reference: Vec<f32> = kiln::no_grad(|| {
        x.max_pool2d(&kiln::Pool2dOptions::new([2, 2]))?
            .adaptive_avg_pool2d([2, 2])
    })
    .unwrap()
    .to_vec()
    .unwrap();
    assert_eq!(want, reference);
    if let Some(half) = to_half_or_refused(frozen) {
        let got = half.predict(&x).unwrap().to_vec().unwrap();
        assert!(max_rel_diff(&got, &want) <= 5e-3);
    }
}

/// The ResNet at batch 64: peak bytes during frozen inference stay within the weights plus the
/// planned buffers, below the eval-mode forward's peak, and the plan reuses buffers.
#[test]
fn resnet_memory_plan() {
    let d = own_device();
    let mut model = resnet(&d);
    model.set_training(false);
    let x = images(64, 3, &d);
    kiln::no_grad(|| model.forward(&x)).unwrap();
    d.synchronize().unwrap();
    let base = d.live_bytes();
    d.reset_peak_bytes();
    let y = kiln::no_grad(|| model.forward(&x)).unwrap();
    d.synchronize().unwrap();
    let eval_peak = d.peak_bytes() - base;
    drop(y);
    let frozen = freeze(model, &x).unwrap();
    d.synchronize().unwrap();
    let weights = frozen.weight_bytes();
    let plan = frozen.memory_plan(&[x.dims()]).unwrap();
    frozen.predict(&x).unwrap();
    d.synchronize().unwrap();
    let base = d.live_bytes();
    d.reset_peak_bytes();
    let y = frozen.predict(&x).unwrap();
    d.synchronize().unwrap();
    let peak = d.peak_bytes() - base;
    drop(y);
    println!(
        "resnet batch 64: weights {weights} B, planned {} B, all activations {} B, frozen peak {peak} B, eval peak {eval_peak} B",
        plan.planned_bytes, plan.activation_bytes
    );
    assert!(
        peak <= plan.planned_bytes,
        "peak {peak} > planned {}",
        plan.planned_bytes
    );
    assert!(
        peak < eval_peak,
        "frozen peak {peak} >= eval peak {eval_peak}"
    );
    assert!(plan.planned_bytes < plan.activation_bytes / 2, "{plan:?}");
}

/// A transformer block (reshapes of permuted, strided values copy): peak bytes during frozen
/// inference stay within the planned buffers.
#[test]
fn transformer_memory_plan_holds() {
    let d = own_device();
    let frozen = freeze(block(&d), &tokens(4, 1, &d)).unwrap();
    let x = tokens(16, 2, &d);
    let plan = frozen.memory_plan(&[x.dims()]).unwrap();
    frozen.predict(&x).unwrap();
    d.synchronize().unwrap();
    let base = d.live_bytes();
    d.reset_peak_bytes();
    let y = frozen.predict(&x).unwrap();
    d.synchronize().unwrap();
    let peak = d.peak_bytes() - base;
    drop(y);
    assert!(
        peak <= plan.planned_bytes,
        "peak {peak} > planned {}\n{}",
        plan.planned_bytes,
        frozen.describe()
    );
}
