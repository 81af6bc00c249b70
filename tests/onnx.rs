//! ONNX import and export against ONNX Runtime. Import: four PyTorch models and a module of
//! the ops they leave out, exported by `torch.onnx.export` (tests/fixtures/gen_onnx.py), run in
//! kiln and match ONNX Runtime's outputs at two batch sizes. Export: the files kiln wrote for the digits CNN, the ResNet-style
//! net and the transformer block (tests/fixtures/onnx_fixtures.rs) were run by ONNX Runtime,
//! which matched kiln within 1e-4; here kiln loads those same files and matches ORT's
//! outputs. Then the round trip kiln -> ONNX -> kiln, digits accuracy, and errors.

mod common;

use common::models::*;
use common::*;
use kiln::infer::{freeze, InferenceModel};
use kiln::nn::{Init, Module, Sequential};
use kiln::{Device, Tensor};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name)
}

/// (input, expected output) pairs of a fixture text file.
fn pairs(name: &str) -> Vec<(Nd, Nd)> {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    let mut out = Vec::new();
    let mut input = None;
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let a = parse_array(&f[1..]);
        match f[0] {
            "in" => input = Some(a),
            "out" => out.push((input.take().expect("an in line first"), a)),
            other => panic!("{name}: unknown line kind {other}"),
        }
    }
    out
}

/// The worst ratio of |got - want| to the bound 1e-4 |want| + 1e-5 (1e-4 relative, with a
/// floor for values near zero); at most 1 passes.
fn bound_ratio(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).fold(0f64, |m, (g, w)| {
        m.max((*g as f64 - w).abs() / (1e-4 * w.abs() + 1e-5))
    })
}

/// Runs `model` on each fixture input and checks it against the recorded output.
fn check_against(what: &str, model: &InferenceModel, cases: &[(Nd, Nd)], d: &Device) {
    let mut batches = Vec::new();
    for (x, want) in cases {
        let xs: Vec<f32> = x.data.iter().map(|&v| v as f32).collect();
        let t = Tensor::from_slice(&xs, &x.shape, d).unwrap();
        let y = model.predict(&t).unwrap();
        assert_eq!(y.dims(), &want.shape[..], "{what}: output shape");
        let ratio = bound_ratio(&y.to_vec().unwrap(), &want.data);
        println!("{what} batch {}: {ratio:.4} of the bound", x.shape[0]);
        assert!(
            ratio <= 1.0,
            "{what} at batch {}: {ratio} times the bound 1e-4 |ort| + 1e-5 from ONNX Runtime\n{}",
            x.shape[0],
            model.describe()
        );
        // The outputs depend on the input, so that the comparison sees every layer.
        let per = want.data.len() / want.shape[0];
        let spread = (0..per).fold(0f64, |m, j| {
            let col = (0..want.shape[0]).map(|i| want.data[i * per + j]);
            let (lo, hi) = col.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
            m.max(hi - lo)
        });
        let scale = want.data.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(
            spread > 1e-2 * scale,
            "{what}: the samples' outputs hardly differ ({spread:e})"
        );
        batches.push(x.shape[0]);
    }
    assert!(batches.len() >= 2, "{what}: {batches:?}");
}

#[test]
fn pytorch_exports_match_onnx_runtime() {
    let d = dev();
    for name in ["resnet", "mobilenet", "transformer", "mlp", "ops"] {
        let model = InferenceModel::load_onnx(&fixture(&format!("{name}.onnx")), &d)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_against(name, &model, &pairs(&format!("{name}.txt")), &d);
    }
}

#[test]
fn kiln_exports_match_onnx_runtime() {
    let d = dev();
    for name in ["digits", "resnet", "transformer", "zoo"] {
        let path = fixture(&format!("kiln_{name}.onnx"));
        let model =
            InferenceModel::load_onnx(&path, &d).unwrap_or_else(|e| panic!("kiln_{name}: {e}"));
        // ONNX Runtime's outputs on the file kiln wrote, and kiln's own when it wrote it.
        check_against(
            &format!("kiln_{name} vs ORT"),
            &model,
            &pairs(&format!("kiln_{name}.ort.txt")),
            &d,
        );
        check_against(
            &format!("kiln_{name} vs kiln"),
            &model,
            &pairs(&format!("kiln_{name}.txt")),
            &d,
        );
    }
}

/// Freezes `model`, exports it with today's exporter, loads the bytes back, and compares
/// outputs at two batch sizes.
fn round_trip<M: Module>(
    name: &str,
    model: M,
    input: impl Fn(usize, u64, &Device) -> Tensor,
) -> InferenceModel {
    let d = dev();
    let frozen = freeze(model, &input(4, 99, &d)).unwrap();
    let bytes = frozen
        .to_onnx_bytes()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let back =
        InferenceModel::from_onnx_bytes(&bytes, &d).unwrap_or_else(|e| panic!("{name}: {e}"));
    for n in [3usize, 6] {
        let x = input(n, n as u64, &d);
        let want: Vec<f64> = frozen
            .predict(&x)
            .unwrap()
            .to_vec()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let got = back.predict(&x).unwrap();
        let ratio = bound_ratio(&got.to_vec().unwrap(), &want);
        assert!(
            ratio <= 1.0,
            "{name} at batch {n}: {ratio} times the bound\n{}\nreloaded:\n{}",
            frozen.describe(),
            back.describe()
        );
    }
    back
}

#[test]
fn kiln_onnx_kiln_round_trips() {
    let d = dev();
    let cnn = Sequential::from_spec(&mut Init::new(&d, 1), DIGITS_CNN).unwrap();
    round_trip("digits", cnn, images);
    let back = round_trip("resnet", resnet(&d), images);
    // The reloaded graph is optimised like a captured one: its batch norms fold again.
    assert!(
        !back.describe().contains("batch_norm"),
        "{}",
        back.describe()
    );
    let back = round_trip("transformer", block(&d), tokens);
    // The reloaded graph exports again (its token ids pass a cast to integers, a trunc) and
    // gives the same outputs.
    let again = InferenceModel::from_onnx_bytes(&back.to_onnx_bytes().unwrap(), &d).unwrap();
    let x = tokens(3, 8, &d);
    let (a, b) = (
        back.predict(&x).unwrap().to_vec().unwrap(),
        again.predict(&x).unwrap(),
    );
    let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    assert!(bound_ratio(&b.to_vec().unwrap(), &a) <= 1.0);
    assert!(back.describe().contains("Trunc"), "{}", back.describe());
    round_trip("zoo", zoo(&d), zoo_input);
}

/// A trained digits model keeps every prediction, so its accuracy, through kiln -> ONNX file
/// -> kiln.
#[test]
fn digits_accuracy_survives_onnx() {
    use kiln::data::{self, DataLoader, Dataset};
    let d = dev();
    let spec = "conv2d(1,8,3,p=1) batchnorm2d(8) relu maxpool2d(2) flatten linear(128,32) \
                batchnorm1d(32) gelu linear(32,10)";
    let mut model = Sequential::from_spec(&mut Init::new(&d, 3), spec).unwrap();
    train_digits(&mut model, 0..2, 0.01, 64, 1, &d);
    let (_, test) = data::digits().unwrap().split(0.8, 0).unwrap();
    let frozen = freeze(model, &images(2, 0, &d)).unwrap();
    let path = std::env::temp_dir().join(format!("kiln-digits-{}.onnx", std::process::id()));
    frozen.export_onnx(&path).unwrap();
    let back = InferenceModel::load_onnx(&path, &d).unwrap();
    std::fs::remove_file(&path).ok();
    let (mut right, mut right_back) = (0, 0);
    for b in DataLoader::new(&test, 64, &d).epoch(0) {
        let b = b.unwrap();
        let (p, q) = (
            frozen.classify(&b.inputs).unwrap(),
            back.classify(&b.inputs).unwrap(),
        );
        assert_eq!(p, q, "predictions differ after the round trip");
        right += p.iter().zip(&b.labels).filter(|(p, l)| p == l).count();
        right_back += q.iter().zip(&b.labels).filter(|(q, l)| q == l).count();
    }
    let acc = right as f64 / test.len() as f64;
    assert_eq!(right, right_back);
    assert!(acc > 0.9, "the model learned: accuracy {acc}");
}

/// `bytes` with the first occurrence of `from` replaced by `to` (same length).
fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} is in the file", String::from_utf8_lossy(from)));
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

fn load_err(bytes: &[u8]) -> String {
    match InferenceModel::from_onnx_bytes(bytes, &dev()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_and_malformed_files_are_errors() {
    let mlp = std::fs::read(fixture("mlp.onnx")).unwrap();
    // An op kiln lacks: the error names the node and the op.
    let e = load_err(&replace(&mlp, b"\x22\x03Erf", b"\x22\x03Erx"));
    assert!(
        e.contains("\"Erx\" is not supported") && e.contains("node \""),
        "{e}"
    );
    // An attribute kiln does not know.
    let e = load_err(&replace(&mlp, b"epsilon", b"epsilom"));
    assert!(
        e.contains("LayerNormalization") && e.contains("unsupported attribute \"epsilom\""),
        "{e}"
    );
    // Not protobuf, and truncated protobuf.
    let e = load_err(b"this is not an onnx file");
    assert!(e.contains("not a valid ONNX"), "{e}");
    let e = load_err(&mlp[..mlp.len() / 2]);
    assert!(
        e.contains("not a valid ONNX") || e.contains("load_onnx"),
        "{e}"
    );
    // A missing file names the path.
    let e = InferenceModel::load_onnx(&fixture("absent.onnx"), &dev())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("absent.onnx"), "{e}");
    // A wrong input shape at run time is an Err, not a panic.
    let m = InferenceModel::from_onnx_bytes(&mlp, &dev()).unwrap();
    assert!(m.predict(&Tensor::ones(&[2, 7], &dev()).unwrap()).is_err());
    // Exports of what ONNX cannot say in kiln's terms are errors too: an unbatched conv.
    let d = dev();
    let w = Tensor::randn(&[2, 1, 3, 3], 1, &d).unwrap();
    let x = Tensor::randn(&[1, 5, 5], 2, &d).unwrap();
    let frozen = kiln::infer::freeze_fn(std::slice::from_ref(&x), &[None], |t| {
        Ok(vec![t[0].conv2d(&w, None, &Default::default())?])
    })
    .unwrap();
    let e = frozen.to_onnx_bytes().err().unwrap().to_string();
    assert!(e.contains("conv2d") && e.contains("unbatched"), "{e}");
}
