//! Frozen inference: same outputs as eval mode, folding, planned memory, loading from a
//! checkpoint, errors, threads.

mod common;

use common::*;
use kiln::data::{self, DataLoader, Dataset};
use kiln::infer::{freeze, InferenceModel};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Adam, AdamOptions, Optimizer};
use kiln::{Device, Tensor};

const SPEC: &str = "conv2d(1,8,3,p=1) batchnorm2d(8) relu conv2d(8,16,3,p=1) relu maxpool2d(2) \
                    flatten linear(256,32) batchnorm1d(32) gelu dropout(0.3) linear(32,10)";

/// A model trained for a few steps, so batch norm has moved its running statistics.
fn trained(d: &Device) -> (Sequential, Adam) {
    let mut model = Sequential::from_spec(&mut Init::new(d, 3), SPEC).unwrap();
    let mut opt = Adam::new(
        model.parameters(),
        AdamOptions {
            lr: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let (train_set, _) = data::digits().unwrap().split(0.8, 0).unwrap();
    let loader = DataLoader::new(&train_set, 64, d).shuffle(2);
    for batch in loader.epoch(0).take(5) {
        let batch = batch.unwrap();
        let loss = kiln::loss::cross_entropy(
            &model.forward(&batch.inputs).unwrap(),
            &batch.targets,
            &Default::default(),
        )
        .unwrap();
        opt.zero_grad();
        loss.backward().unwrap();
        opt.step().unwrap();
    }
    model.set_training(false);
    (model, opt)
}

fn digits_batch(d: &Device, n: usize) -> Tensor {
    let (_, test) = data::digits().unwrap().split(0.8, 0).unwrap();
    let loader = DataLoader::new(&test, n, d);
    let batch = loader.epoch(0).next().unwrap().unwrap();
    batch.inputs
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn frozen_outputs_equal_eval_mode_and_memory_holds_only_weights_and_plans() {
    let d = own_device();
    let (model, opt) = trained(&d);
    let x = digits_batch(&d, 64);
    let eval = kiln::no_grad(|| model.forward(&x))
        .unwrap()
        .to_vec()
        .unwrap();
    d.synchronize().unwrap();
    let base = d.live_bytes();
    d.reset_peak_bytes();
    let y = kiln::no_grad(|| model.forward(&x)).unwrap();
    d.synchronize().unwrap();
    let eval_peak = d.peak_bytes() - base;
    drop(y);
    let frozen = freeze(model, &x).unwrap();
    drop(opt);
    // conv-bn-relu and linear-bn-gelu each became one kernel; dropout vanished.
    assert_eq!(
        frozen.node_count(),
        6,
        "conv+bn+relu, conv+relu, pool, flatten, linear+bn+gelu, linear:\n{}",
        frozen.describe()
    );
    let y = frozen.predict(&x).unwrap();
    assert_eq!(y.dims(), &[64, 10]);
    let got = y.to_vec().unwrap();
    let diff = max_rel_diff(&got, &eval);
    assert!(
        diff <= 1e-4,
        "frozen vs eval-mode: max relative difference {diff}"
    );
    drop(y);
    // Peak memory of a call: at most the plan's buffers above what was live before (the
    // weights and the input), and below the eval-mode forward's.
    let plan = frozen.memory_plan(&[x.dims()]).unwrap();
    d.synchronize().unwrap();
    let base = d.live_bytes();
    d.reset_peak_bytes();
    let y = frozen.predict(&x).unwrap();
    d.synchronize().unwrap();
    let peak = d.peak_bytes() - base;
    assert!(
        peak <= plan.planned_bytes,
        "frozen peak {peak} bytes > planned {}",
        plan.planned_bytes
    );
    assert!(
        peak < eval_peak,
        "frozen peak {peak} >= eval peak {eval_peak}"
    );
    drop(y);
}

#[test]
fn loads_from_the_file_alone() {
    let d = dev();
    let (model, _) = trained(&d);
    let path = std::env::temp_dir().join(format!("kiln-infer-{}.safetensors", std::process::id()));
    let x = digits_batch(&d, 16);
    let frozen = freeze(model, &x).unwrap();
    frozen.save(&path).unwrap();
    let want = frozen.predict(&x).unwrap().to_vec().unwrap();
    let fresh = own_device();
    let loaded = InferenceModel::load(&path, &fresh).unwrap();
    let xf = Tensor::from_slice(&x.to_vec().unwrap(), x.dims(), &fresh).unwrap();
    let got = loaded.predict(&xf).unwrap().to_vec().unwrap();
    assert_eq!(got, want);
    let labels = loaded.classify(&xf).unwrap();
    assert_eq!(labels.len(), 16);

    // A checkpoint of a training module is not a frozen model; bad files are errors.
    let (model, _) = trained(&d);
    kiln::checkpoint::save(&path, &model, None, Some(SPEC)).unwrap();
    let e = InferenceModel::load(&path, &d).err().unwrap().to_string();
    assert!(e.contains("not a frozen kiln model"), "{e}");
    frozen.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert!(InferenceModel::load(&path, &d).is_err(), "truncated file");
    std::fs::write(&path, b"garbage").unwrap();
    assert!(InferenceModel::load(&path, &d).is_err(), "corrupt file");
    std::fs::remove_file(&path).ok();
}

#[test]
fn wrong_inputs_are_err() {
    let d = dev();
    let frozen = freeze(
        Sequential::from_spec(&mut Init::new(&d, 0), SPEC).unwrap(),
        &Tensor::ones(&[3, 1, 8, 8], &d).unwrap(),
    )
    .unwrap();
    let e = frozen
        .predict(&Tensor::ones(&[2, 3, 8, 8], &d).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("needs [2, 1, 8, 8]"), "{e}");
    let e = frozen
        .predict(&Tensor::ones(&[2, 1, 10, 10], &d).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("needs [2, 1, 8, 8]"), "{e}");
    assert!(frozen.predict(&Tensor::ones(&[64], &d).unwrap()).is_err());
    let other = own_device();
    assert!(frozen
        .predict(&Tensor::ones(&[1, 1, 8, 8], &other).unwrap())
        .is_err());
}

#[test]
fn concurrent_predictions_agree() {
    let d = dev();
    let (model, _) = trained(&d);
    let inputs: Vec<Tensor> = (0..4)
        .map(|i| Tensor::randn(&[8, 1, 8, 8], i, &d).unwrap())
        .collect();
    let frozen = std::sync::Arc::new(freeze(model, &inputs[0]).unwrap());
    let want: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| frozen.predict(x).unwrap().to_vec().unwrap())
        .collect();
    let handles: Vec<_> = inputs
        .into_iter()
        .zip(want)
        .map(|(x, w)| {
            let f = frozen.clone();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    assert_eq!(f.predict(&x).unwrap().to_vec().unwrap(), w);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn accuracy(model: &InferenceModel, d: &Device) -> f64 {
    let (_, test) = data::digits().unwrap().split(0.8, 0).unwrap();
    let loader = DataLoader::new(&test, 64, d);
    let mut right = 0;
    for b in loader.epoch(0) {
        let b = b.unwrap();
        let p = model.classify(&b.inputs).unwrap();
        right += p.iter().zip(&b.labels).filter(|(p, l)| p == l).count();
    }
    right as f64 / test.len() as f64
}

#[test]
fn half_precision_keeps_accuracy_and_halves_weights() {
    let d = dev();
    let mut model = Sequential::from_spec(&mut Init::new(&d, 3), SPEC).unwrap();
    let mut opt = Adam::new(
        model.parameters(),
        AdamOptions {
            lr: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let (train_set, _) = data::digits().unwrap().split(0.8, 0).unwrap();
    let loader = DataLoader::new(&train_set, 32, &d).shuffle(2);
    kiln::train::fit(
        &mut model,
        &mut opt,
        &loader,
        None,
        kiln::train::FitOptions {
            epochs: 2,
            ..Default::default()
        },
    )
    .unwrap();
    model.set_training(false);
    let x = digits_batch(&d, 32);
    let f32_model = freeze(model, &x).unwrap();
    let acc32 = accuracy(&f32_model, &d);
    let y32 = f32_model.predict(&x).unwrap().to_vec().unwrap();
    let w32 = f32_model.weight_bytes();
    assert!(acc32 > 0.9, "f32 accuracy {acc32}");
    // Without SHADER_F16, to_half_or_refused has asserted the documented Err.
    let Some(f16_model) = to_half_or_refused(f32_model) else {
        return;
    };
    assert_eq!(f16_model.precision(), kiln::infer::Precision::F16);
    assert_eq!(f16_model.weight_bytes() * 2, w32);
    let y16 = f16_model.predict(&x).unwrap().to_vec().unwrap();
    let diff = max_rel_diff(&y16, &y32);
    assert!(
        diff < 2e-2,
        "f16 logits differ from f32 by {diff} (relative to the largest)"
    );
    let acc16 = accuracy(&f16_model, &d);
    assert!(
        (acc16 - acc32).abs() <= 0.005,
        "f16 accuracy {acc16} vs f32 {acc32}"
    );
}

/// Linear layers with a fused activation, on aligned sizes (the vec4 kernels plus an in-place
/// activation pass on software adapters) and unaligned ones (the activation in the matmul
/// kernel's epilogue), in f32 and f16, against an f64 reference. Each model ends in a linear
/// layer, so outputs are compared before any squashing activation.
#[test]
fn fused_linear_activations() {
    let d = dev();
    for spec in [
        "linear(12,20) relu linear(20,8) tanh linear(8,4) sigmoid linear(4,3)",
        "linear(13,7) relu linear(7,5) gelu linear(5,3) silu linear(3,2)",
    ] {
        let mut model = Sequential::from_spec(&mut Init::new(&d, 5), spec).unwrap();
        model.set_training(false);
        let inputs: usize = spec
            .split('(')
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let x = Tensor::randn(&[33, inputs], 6, &d).unwrap();
        let xs = x.to_vec().unwrap();
        let params = host_params(&model);
        let acts: Vec<&str> = spec
            .split(' ')
            .filter(|l| !l.starts_with("linear"))
            .collect();
        let frozen = freeze(model, &x).unwrap();
        let got = frozen.predict(&x).unwrap().to_vec().unwrap();
        let (want, bound) = linear_stack_reference(&xs, 33, &params, &acts, false);
        check_within(spec, &got, &want, &bound);
        if let Some(half) = to_half_or_refused(frozen) {
            let got = half.predict(&x).unwrap().to_vec().unwrap();
            let (want, bound) = linear_stack_reference(&xs, 33, &params, &acts, true);
            check_within(&format!("{spec} f16"), &got, &want, &bound);
        }
    }
}

/// Half-precision frozen linear layers (k multiples of 16) run on cooperative matrices where
/// the device has them, against the f64 reference with the f16 storage bound. Where the adapter
/// offers none (lavapipe among them) the device says so, forcing the kernel is an `Err` naming
/// the missing feature, the same model runs on the usual f16 kernels (checked the same way),
/// and the test prints that it skipped the tensor-core check.
#[test]
fn half_precision_linear_on_cooperative_matrices() {
    let d = Device::new(&kiln::DeviceOptions {
        cooperative_matrix: true,
        ..Default::default()
    })
    .unwrap();
    let coop = d.has_cooperative_matrix();
    let spec = "linear(64,48) relu linear(48,32) tanh linear(32,16)";
    let mut model = Sequential::from_spec(&mut Init::new(&d, 8), spec).unwrap();
    model.set_training(false);
    let x = Tensor::randn(&[37, 64], 9, &d).unwrap();
    let xs = x.to_vec().unwrap();
    let params = host_params(&model);
    let frozen = freeze(model, &x).unwrap();
    if let Some(half) = to_half_or_refused(frozen) {
        d.set_profiling(true);
        let got = half.predict(&x).unwrap().to_vec().unwrap();
        let ran: Vec<String> = d.profile().into_iter().map(|k| k.kernel).collect();
        d.set_profiling(false);
        let (want, bound) = linear_stack_reference(&xs, 37, &params, &["relu", "tanh"], true);
        check_within(&format!("{spec} f16, coop {coop}"), &got, &want, &bound);
        let on_coop = ran
            .iter()
            .filter(|k| k.starts_with("matmul_coop16_nt"))
            .count();
        assert_eq!(on_coop > 0, coop, "{ran:?}");
    }
    let a = Tensor::ones(&[16, 16], &d).unwrap();
    let forced = a.matmul_with_kernel(&a, kiln::kernels::Kernel::MatmulCoop16NnFwd);
    let e = forced.unwrap_err().to_string();
    if coop {
        assert!(e.contains("multiplies f16 operands"), "{e}");
    } else {
        assert!(e.contains("needs cooperative matrices"), "{e}");
        eprintln!(
            "SKIPPED the tensor-core check: {} offers no cooperative matrices (16x16x16 f16 \
             into f32, 32-wide subgroups); its f16 layers ran on the usual kernels",
            d.name()
        );
    }
}

/// Each parameter's values and shape, read back.
fn host_params(model: &Sequential) -> Vec<(Vec<f32>, Vec<usize>)> {
    model
        .parameters()
        .iter()
        .map(|p| (p.to_vec().unwrap(), p.dims().to_vec()))
        .collect()
}

fn round16(v: f64) -> f64 {
    half::f16::from_f64(v).to_f64()
}

/// An f64 reference of `linear act linear act ... linear` on `rows` rows, and a per-element
/// error bound for a kernel that accumulates in f32 and, when `half`, stores weights, inputs and
/// activations in f16. The bound propagates through each layer: |W| times the incoming bound,
/// plus f32 accumulation (k * 2^-24 * sum |W||h|), times the activation's Lipschitz constant,
/// plus the storage rounding (one f16 ulp, 2^-10 relative, since kernel and reference may round
/// a value near a rounding boundary differently) and 1e-6 for the f32 activation functions.
fn linear_stack_reference(
    x: &[f32],
    rows: usize,
    params: &[(Vec<f32>, Vec<usize>)],
    acts: &[&str],
    half: bool,
) -> (Vec<f64>, Vec<f64>) {
    let store = |v: f64| if half { round16(v) } else { v };
    let ulp = if half { 2f64.powi(-10) } else { 2f64.powi(-23) };
    let mut h: Vec<f64> = x.iter().map(|&v| store(v as f64)).collect();
    let mut err: Vec<f64> = h
        .iter()
        .map(|v| if half { v.abs() * ulp } else { 0.0 })
        .collect();
    let mut width = x.len() / rows;
    for (layer, pair) in params.chunks(2).enumerate() {
        let (w, wd) = (&pair[0].0, &pair[0].1);
        let b = &pair[1].0;
        let (out, k) = (wd[0], wd[1]);
        assert_eq!(k, width, "layer {layer} input width");
        let act = acts.get(layer).copied();
        let (f, lipschitz): (fn(f64) -> f64, f64) = match act {
            None => (|v| v, 1.0),
            Some("relu") => (|v: f64| v.max(0.0), 1.0),
            Some("tanh") => (f64::tanh, 1.0),
            Some("sigmoid") => (|v: f64| 1.0 / (1.0 + (-v).exp()), 0.25),
            Some("gelu") => (|v: f64| 0.5 * v * (1.0 + erf(v / 2f64.sqrt())), 1.13),
            Some("silu") => (|v: f64| v / (1.0 + (-v).exp()), 1.1),
            Some(a) => panic!("no reference for {a}"),
        };
        let mut nh = vec![0.0; rows * out];
        let mut ne = vec![0.0; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let (mut y, mut mag, mut prop) =
                    (store(b[o] as f64), store(b[o] as f64).abs(), 0.0);
                for j in 0..k {
                    let wv = store(w[o * k + j] as f64);
                    y += wv * h[r * k + j];
                    mag += (wv * h[r * k + j]).abs();
                    prop += wv.abs() * err[r * k + j];
                }
                let pre = prop + (k + 1) as f64 * 2f64.powi(-24) * mag;
                let v = store(f(y));
                nh[r * out + o] = v;
                ne[r * out + o] = lipschitz * pre + 2.0 * ulp * v.abs() + 1e-6;
            }
        }
        h = nh;
        err = ne;
        width = out;
    }
    (h, err)
}

fn check_within(what: &str, got: &[f32], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        assert!(
            (g as f64 - w).abs() <= b,
            "{what}[{i}]: got {g}, want {w} (bound {b})"
        );
    }
}

/// Relu runs in the matmul kernels' epilogue, also where the vec4 kernels serve a frozen linear
/// layer or a convolution run as weight @ im2col matrix (software adapters): equal to eval mode,
/// a NaN input still NaN out (as PyTorch's relu), and no second pass over the output.
#[test]
fn relu_epilogues_keep_nan_and_need_no_second_pass() {
    let d = own_device();
    for (spec, dims) in [
        ("linear(8,16) relu", vec![6, 8]),
        ("conv2d(4,32,3,p=1) relu", vec![2, 4, 6, 6]),
    ] {
        let mut model = Sequential::from_spec(&mut Init::new(&d, 8), spec).unwrap();
        model.set_training(false);
        let mut xs = Tensor::randn(&dims, 9, &d).unwrap().to_vec().unwrap();
        xs[3] = f32::NAN;
        let x = Tensor::from_slice(&xs, &dims, &d).unwrap();
        let want = model.forward(&x).unwrap().to_vec().unwrap();
        let frozen = freeze(model, &x).unwrap();
        d.synchronize().unwrap();
        d.set_profiling(true);
        let got = frozen.predict(&x).unwrap().to_vec().unwrap();
        let ran: Vec<String> = d.profile().into_iter().map(|k| k.kernel).collect();
        d.set_profiling(false);
        assert!(
            want.iter().any(|v| v.is_nan()),
            "{spec}: the case has a NaN"
        );
        assert!(want.contains(&0.0), "{spec}: the case clips");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{spec} [{i}]: frozen {g}, eval {w}"
            );
        }
        if d.adapter_info().device_type == kiln::wgpu::DeviceType::Cpu {
            assert!(
                ran.iter()
                    .any(|k| k.starts_with("matmul_sg8") || k.starts_with("matmul_vec4")),
                "{spec}: {ran:?}"
            );
            assert!(
                !ran.iter().any(|k| k.starts_with("unary")),
                "{spec}: {ran:?}"
            );
        }
    }
}
