//! Int8 quantization of frozen models, static and dynamic: accuracy on the digits test split against the
//! f32 model (the digits CNN within 0.5 points, the ResNet-style net within 1), the saved
//! file's size, loading it back, and bad input. The kernels' bit-exact tests are unit tests
//! of `src/ops/quant.rs`; the quantization semantics are checked against ONNX Runtime in
//! `tests/quant.rs`.

mod common;

use common::models::*;
use common::*;
use kiln::data::{self, DataLoader};
use kiln::infer::{freeze, InferenceModel, Observer, QuantizeOptions};
use kiln::nn::{Init, Module, Sequential};
use kiln::{Device, Tensor};

fn train<M: Module>(model: &mut M, epochs: usize, d: &Device) {
    train_digits(model, 0..epochs, 0.01, 64, 1, d);
}

fn accuracy(model: &InferenceModel, d: &Device) -> (f64, Vec<usize>) {
    digits_accuracy(model, d)
}

fn calibration(d: &Device) -> Vec<Tensor> {
    let (train, _) = data::digits().unwrap().split(0.8, 0).unwrap();
    DataLoader::new(&train, 64, d)
        .shuffle(9)
        .epoch(0)
        .take(4)
        .map(|b| b.unwrap().inputs)
        .collect()
}

fn file_bytes(m: &InferenceModel) -> usize {
    m.to_bytes().unwrap().len()
}

/// Quantizes `frozen`, checks accuracy within `points` of f32, the file's size (at most
/// `size` of the f32 file) and reload.
fn check(name: &str, frozen: &InferenceModel, points: f64, size: f64, d: &Device) {
    let (f32_acc, _) = accuracy(frozen, d);
    assert!(f32_acc > 85.0, "{name}: the f32 model learned ({f32_acc}%)");
    for observer in [Observer::MinMax, Observer::Percentile(99.99)] {
        let q = frozen
            .quantize(&QuantizeOptions {
                calibration: calibration(d),
                observer,
            })
            .unwrap();
        let g = q.describe();
        assert!(
            g.contains("qgemm") && !g.contains("conv2d[") && !g.contains("linear["),
            "{g}"
        );
        // Convolutions of 16 channels or more run over quantized pixels, not patch rows, and
        // a product whose result only the next product reads writes it in int8.
        assert!(g.contains("window: Some"), "{g}");
        assert!(g.contains("int8_out: Some"), "{g}");
        // No tensor is quantized twice alike (a block's conv1 and projection share one).
        let quantizations: Vec<&str> = g
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(_, r)| r))
            .filter(|r| r.starts_with("quantize"))
            .collect();
        let unique: std::collections::HashSet<&&str> = quantizations.iter().collect();
        assert_eq!(unique.len(), quantizations.len(), "{g}");
        let (acc, preds) = accuracy(&q, d);
        println!("{name} {observer:?}: f32 {f32_acc:.2}%, int8 {acc:.2}%");
        assert!(
            (acc - f32_acc).abs() <= points,
            "{name} {observer:?}: int8 {acc}% against f32 {f32_acc}%"
        );
        // The file: int8 weights; it loads and predicts alike.
        let (fb, qb) = (file_bytes(frozen), file_bytes(&q));
        println!(
            "{name}: int8 file {qb} bytes, f32 {fb} ({:.2}x)",
            qb as f64 / fb as f64
        );
        assert!(
            qb as f64 <= size * fb as f64,
            "{name}: int8 file {qb} bytes, f32 {fb}"
        );
        let back = InferenceModel::from_bytes(&q.to_bytes().unwrap(), d).unwrap();
        assert_eq!(
            accuracy(&back, d).1,
            preds,
            "{name}: the reloaded model predicts alike"
        );
    }
}

/// Dynamic quantization: linear layers only, no calibration; accuracy within a point, the
/// file reloads and predicts alike.
fn check_dynamic(name: &str, frozen: &InferenceModel, d: &Device) {
    let (f32_acc, _) = accuracy(frozen, d);
    let q = frozen.quantize_dynamic().unwrap();
    let g = q.describe();
    assert!(
        g.contains("quantize_dynamic") && !g.contains("linear["),
        "{g}"
    );
    let (acc, preds) = accuracy(&q, d);
    println!("{name} dynamic: f32 {f32_acc:.2}%, int8 {acc:.2}%");
    assert!(
        (acc - f32_acc).abs() <= 1.0,
        "{name}: dynamic {acc}% against {f32_acc}%"
    );
    let back = InferenceModel::from_bytes(&q.to_bytes().unwrap(), d).unwrap();
    assert_eq!(
        accuracy(&back, d).1,
        preds,
        "{name}: the reloaded model predicts alike"
    );
}

#[test]
fn int8_digits_cnn_keeps_its_accuracy() {
    let d = dev();
    let spec = "conv2d(1,16,3,p=1) batchnorm2d(16) relu conv2d(16,32,3,p=1) relu maxpool2d(2) \
                flatten linear(512,64) relu linear(64,10)";
    let mut model = Sequential::from_spec(&mut Init::new(&d, 1), spec).unwrap();
    // Trained to convergence: after 3 epochs at this rate, the f32 accuracy itself moved by
    // 0.6 points with the software adapter's vector width, and the test images near the
    // decision boundary flipped under int8 rounding one way on one machine and not another.
    train(&mut model, 8, &d);
    let frozen = freeze(model, &images(2, 0, &d)).unwrap();
    check("digits CNN", &frozen, 0.5, 0.3, &d);
    check_dynamic("digits CNN", &frozen, &d);
}

#[test]
fn int8_resnet_keeps_its_accuracy() {
    let d = dev();
    let mut model = resnet(&d);
    train(&mut model, 3, &d);
    let frozen = freeze(model, &images(2, 0, &d)).unwrap();
    // 24 KiB of f32 weights: the graph and the per-channel scales and biases weigh as much as
    // the int8 weights, so the file shrinks less than the CNN's.
    check("ResNet", &frozen, 1.0, 0.5, &d);
    check_dynamic("ResNet", &frozen, &d);
}

/// The transformer block's linear layers (over (N, T, C)) quantized at run time stay close
/// to the f32 block.
#[test]
fn dynamic_transformer_block_stays_close() {
    let d = dev();
    let frozen = freeze(block(&d), &tokens(2, 1, &d)).unwrap();
    let q = frozen.quantize_dynamic().unwrap();
    let x = tokens(4, 3, &d);
    let (a, b) = (
        frozen.predict(&x).unwrap().to_vec().unwrap(),
        q.predict(&x).unwrap().to_vec().unwrap(),
    );
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(err <= 0.05 * scale, "{err} of {scale}");
    assert!(err > 0.0, "the int8 path ran");
}

#[test]
fn bad_calibration_is_an_error() {
    let d = dev();
    let net = Sequential::from_spec(&mut Init::new(&d, 0), "linear(64,10)").unwrap();
    let frozen = freeze(net, &Tensor::randn(&[2, 64], 1, &d).unwrap()).unwrap();
    let q = |calibration: Vec<Tensor>, observer| {
        frozen
            .quantize(&QuantizeOptions {
                calibration,
                observer,
            })
            .err()
            .map(|e| e.to_string())
    };
    let e = q(vec![], Observer::MinMax).unwrap();
    assert!(e.contains("empty"), "{e}");
    let e = q(
        vec![Tensor::randn(&[4, 63], 2, &d).unwrap()],
        Observer::MinMax,
    )
    .unwrap();
    assert!(e.contains("calibration batch 0"), "{e}");
    let ok = vec![Tensor::randn(&[4, 64], 2, &d).unwrap()];
    for p in [0.0, -1.0, 100.5, f32::NAN] {
        assert!(q(ok.clone(), Observer::Percentile(p)).is_some(), "{p}");
    }
    let nan = Tensor::from_slice(&[f32::NAN; 64], &[1, 64], &d).unwrap();
    let e = q(vec![nan], Observer::MinMax).unwrap();
    assert!(e.contains("non-finite"), "{e}");
    assert!(q(ok, Observer::MinMax).is_none());
}

/// A matmul with a constant right operand (x @ W, batched over a leading axis) runs as an
/// integer product, static and dynamic, and stays close to f32.
#[test]
fn constant_matmuls_run_on_integers() {
    let d = dev();
    let w = Tensor::randn(&[24, 13], 1, &d).unwrap();
    let x = Tensor::randn(&[2, 5, 24], 2, &d).unwrap();
    let frozen = kiln::infer::freeze_fn(std::slice::from_ref(&x), &[Some(0)], |t| {
        Ok(vec![t[0]
            .matmul(&w)?
            .relu()?
            .matmul(&w.narrow(0, 0, 13)?)?])
    })
    .unwrap();
    assert!(
        frozen.describe().contains("matmul"),
        "{}",
        frozen.describe()
    );
    let calibration = vec![Tensor::randn(&[4, 5, 24], 3, &d).unwrap()];
    let statically = frozen
        .quantize(&QuantizeOptions {
            calibration,
            observer: Observer::MinMax,
        })
        .unwrap();
    let y = Tensor::randn(&[3, 5, 24], 4, &d).unwrap();
    let a = frozen.predict(&y).unwrap().to_vec().unwrap();
    for q in [statically, frozen.quantize_dynamic().unwrap()] {
        let g = q.describe();
        assert!(g.contains("qgemm") && !g.contains("matmul"), "{g}");
        let b = q.predict(&y).unwrap().to_vec().unwrap();
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(err <= 0.05 * scale && err > 0.0, "{err} of {scale}\n{g}");
    }
}
