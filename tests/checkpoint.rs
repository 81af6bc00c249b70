//! Checkpoints: round trips, strict loading errors, and PyTorch interoperability in both
//! directions (fixtures from tests/fixtures/gen_checkpoint.py).
//!
//! To regenerate the kiln-written fixtures: `KILN_WRITE_FIXTURES=1 cargo test --release --test
//! checkpoint`, then `python3 tests/fixtures/gen_checkpoint.py`.

mod common;

use std::path::PathBuf;

use common::*;
use kiln::data::{self, Dataset};
use kiln::nn::{BatchNorm, Conv2d, Flatten, Init, Linear, MaxPool2d, Module, Relu, Sequential};
use kiln::optim::{Adam, AdamOptions, Optimizer, Sgd, SgdOptions};
use kiln::{Conv2dOptions, Error, Pool2dOptions, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The digits example's CNN (`torch.nn.Sequential` with the same layers has the same names).
fn digits_cnn(seed: u64) -> Sequential {
    let mut init = Init::new(&dev(), seed);
    let pad1 = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    Sequential::new()
        .add(Conv2d::new(&mut init, 1, 16, [3, 3], pad1, true).unwrap())
        .add(Relu)
        .add(Conv2d::new(&mut init, 16, 32, [3, 3], pad1, true).unwrap())
        .add(Relu)
        .add(MaxPool2d(Pool2dOptions::new([2, 2])))
        .add(Flatten::default())
        .add(Linear::new(&mut init, 512, 64, true).unwrap())
        .add(Relu)
        .add(Linear::new(&mut init, 64, 10, true).unwrap())
}

/// A small network with batch norm (running statistics and PyTorch's int64 counter).
fn digits_bn(seed: u64) -> Sequential {
    let mut init = Init::new(&dev(), seed);
    let pad1 = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    Sequential::new()
        .add(Conv2d::new(&mut init, 1, 4, [3, 3], pad1, true).unwrap())
        .add(BatchNorm::new_2d(&mut init, 4).unwrap())
        .add(Relu)
        .add(Flatten::default())
        .add(Linear::new(&mut init, 256, 10, true).unwrap())
}

/// The first 8 digits, as the fixtures' input batch.
fn digits_batch() -> Tensor {
    let d = data::digits().unwrap();
    let mut x = Vec::new();
    for i in 0..8 {
        d.read(i, &mut x).unwrap();
    }
    Tensor::from_slice(&x, &[8, 1, 8, 8], &dev()).unwrap()
}

fn logits_fixture(name: &str) -> Nd {
    let text = include_str!("fixtures/checkpoint.txt");
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no logits for {name}"));
    let fields: Vec<&str> = line.split(' ').collect();
    parse_array(&fields[1..])
}

/// Every tensor of `model` (parameters, running statistics, counters) set from host values
/// of a seeded generator, so that its bytes are the same on every GPU (device-side
/// initialisation may round differently from one GPU to another).
fn host_values(model: Sequential, seed: u64) -> Sequential {
    let mut rng = Rng::new(seed);
    for (name, t, _) in model.state_dict() {
        let v: Vec<f32> = if name.ends_with("num_batches_tracked") {
            vec![3.0]
        } else if name.ends_with("running_var") {
            rng.vec(t.numel(), 0.5, 1.5)
        } else {
            rng.vec(t.numel(), -0.3, 0.3)
        };
        t.assign(&Tensor::from_slice(&v, t.dims(), &dev()).unwrap())
            .unwrap();
    }
    model
}

#[test]
fn kiln_files_are_stable_and_pytorch_reads_them() {
    let models = [
        ("kiln_digits_cnn.safetensors", host_values(digits_cnn(5), 5)),
        ("kiln_digits_bn.safetensors", host_values(digits_bn(3), 3)),
    ];
    if std::env::var_os("KILN_WRITE_FIXTURES").is_some() {
        for (file, model) in &models {
            std::fs::write(
                fixture(file),
                kiln::checkpoint::to_bytes(model, None).unwrap(),
            )
            .unwrap();
        }
        // A run that writes the fixtures checks nothing against them: it never passes.
        panic!(
            "fixtures written: run tests/fixtures/gen_checkpoint.py, then this test again \
             without KILN_WRITE_FIXTURES"
        );
    }
    for (file, mut model) in models {
        let bytes = kiln::checkpoint::to_bytes(&model, None).unwrap();
        let committed = std::fs::read(fixture(file)).unwrap();
        assert!(
            bytes == committed,
            "{file}: kiln's writer changed; regenerate the fixtures"
        );
        // The committed file, read by the safetensors crate rather than kiln's reader, holds
        // every tensor of the state dict under its PyTorch name, with its shape and values
        // (num_batches_tracked as PyTorch's int64).
        let st = safetensors::SafeTensors::deserialize(&committed).unwrap();
        let state = model.state_dict();
        assert_eq!(st.len(), state.len(), "{file}: tensor count");
        for (name, t, _) in &state {
            let view = st
                .tensor(name)
                .unwrap_or_else(|e| panic!("{file}: {name}: {e}"));
            assert_eq!(view.shape(), t.dims(), "{file}: {name} shape");
            let got: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 if name.ends_with("num_batches_tracked") => view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{file}: {name} has dtype {other:?}"),
            };
            let want: Vec<f64> = t.to_vec().unwrap().iter().map(|&v| v as f64).collect();
            assert_eq!(got, want, "{file}: {name} values");
        }
        // PyTorch loaded this file (strict load_state_dict) and computed these logits in eval mode.
        model.set_training(false);
        let logits = model.forward(&digits_batch()).unwrap();
        assert_close(
            &format!("PyTorch's logits for {file}"),
            &logits,
            &logits_fixture(file),
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn pytorch_files_load_into_kiln() {
    for (file, mut model) in [
        ("torch_digits_cnn.safetensors", digits_cnn(9)),
        ("torch_digits_bn.safetensors", digits_bn(9)),
    ] {
        kiln::checkpoint::load(&fixture(file), &model, None).unwrap();
        model.set_training(false);
        let logits = model.forward(&digits_batch()).unwrap();
        assert_close(
            &format!("kiln's logits for {file}"),
            &logits,
            &logits_fixture(file),
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn round_trip_with_optimizer_state() {
    let model = digits_cnn(1);
    let mut opt = Adam::new(model.parameters(), AdamOptions::default()).unwrap();
    let x = digits_batch();
    let t = Tensor::from_slice(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &[8], &dev()).unwrap();
    for _ in 0..2 {
        let loss = kiln::loss::cross_entropy(&model.forward(&x).unwrap(), &t, &Default::default())
            .unwrap();
        opt.zero_grad();
        loss.backward().unwrap();
        opt.step().unwrap();
    }
    let path = std::env::temp_dir().join(format!("kiln-test-{}.safetensors", std::process::id()));
    kiln::checkpoint::save(&path, &model, Some(&opt), None).unwrap();
    let copy = digits_cnn(2);
    let mut copy_opt = Adam::new(copy.parameters(), AdamOptions::default()).unwrap();
    kiln::checkpoint::load(&path, &copy, Some(&mut copy_opt)).unwrap();
    std::fs::remove_file(&path).ok();
    for ((n, a, _), (_, b, _)) in model.state_dict().iter().zip(copy.state_dict().iter()) {
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{n}");
    }
    let s1: Vec<Vec<f32>> = opt
        .state()
        .iter()
        .map(|(_, t)| t.to_vec().unwrap())
        .collect();
    let s2: Vec<Vec<f32>> = copy_opt
        .state()
        .iter()
        .map(|(_, t)| t.to_vec().unwrap())
        .collect();
    assert_eq!(s1, s2, "optimizer state restored (moments and step counts)");
    // The next step is identical for both.
    for (m, o) in [
        (&model, &mut opt as &mut dyn Optimizer),
        (&copy, &mut copy_opt as &mut dyn Optimizer),
    ] {
        let loss =
            kiln::loss::cross_entropy(&m.forward(&x).unwrap(), &t, &Default::default()).unwrap();
        o.zero_grad();
        loss.backward().unwrap();
        o.step().unwrap();
    }
    assert_same_state(&model, &opt, &copy, &copy_opt);
}

/// The whole state dict and the whole optimizer state of two copies are bit-identical.
fn assert_same_state(a: &Sequential, oa: &dyn Optimizer, b: &Sequential, ob: &dyn Optimizer) {
    let (sa, sb) = (a.state_dict(), b.state_dict());
    assert_eq!(sa.len(), sb.len(), "state dict sizes");
    for ((n, x, _), (m, y, _)) in sa.iter().zip(&sb) {
        assert_eq!(n, m);
        assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap(), "{n}");
    }
    let (sa, sb) = (oa.state(), ob.state());
    assert_eq!(sa.len(), sb.len(), "optimizer state sizes");
    for ((n, x), (m, y)) in sa.iter().zip(&sb) {
        assert_eq!(n, m);
        assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap(), "optimizer {n}");
    }
}

/// SGD with momentum: its momentum buffers survive a checkpoint, and training resumes
/// identically (every parameter and buffer, after two more steps).
#[test]
fn sgd_state_round_trips() {
    let model = digits_bn(4);
    let options = SgdOptions {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        ..Default::default()
    };
    let mut opt = Sgd::new(model.parameters(), options).unwrap();
    let x = digits_batch();
    let t = Tensor::from_slice(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &[8], &dev()).unwrap();
    let step = |m: &Sequential, o: &mut Sgd| {
        let loss =
            kiln::loss::cross_entropy(&m.forward(&x).unwrap(), &t, &Default::default()).unwrap();
        o.zero_grad();
        loss.backward().unwrap();
        o.step().unwrap();
    };
    step(&model, &mut opt);
    step(&model, &mut opt);
    assert!(!opt.state().is_empty(), "momentum buffers exist");
    let path = std::env::temp_dir().join(format!("kiln-sgd-{}.safetensors", std::process::id()));
    kiln::checkpoint::save(&path, &model, Some(&opt), None).unwrap();
    let copy = digits_bn(5);
    let mut copy_opt = Sgd::new(copy.parameters(), options).unwrap();
    kiln::checkpoint::load(&path, &copy, Some(&mut copy_opt)).unwrap();
    std::fs::remove_file(&path).ok();
    assert_same_state(&model, &opt, &copy, &copy_opt);
    for _ in 0..2 {
        step(&model, &mut opt);
        step(&copy, &mut copy_opt);
    }
    assert_same_state(&model, &opt, &copy, &copy_opt);
}

#[test]
fn bad_checkpoints_are_err_naming_the_tensor() {
    let model = digits_cnn(1);
    let good = kiln::checkpoint::to_bytes(&model, None).unwrap();
    let dir = std::env::temp_dir();
    let path = dir.join(format!("kiln-bad-{}.safetensors", std::process::id()));
    let load = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        kiln::checkpoint::load(&path, &digits_cnn(2), None)
            .unwrap_err()
            .to_string()
    };
    // Missing: a model with an extra layer.
    let bigger = Sequential::new().add_named(
        "0",
        Linear::new(&mut Init::new(&dev(), 0), 2, 2, true).unwrap(),
    );
    std::fs::write(&path, &good).unwrap();
    let e = kiln::checkpoint::load(&path, &bigger, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0.weight") && e.contains("shape"), "{e}");
    let smaller = digits_cnn(3);
    let stored = kiln::checkpoint::from_bytes(&good).unwrap();
    let mut partial = stored;
    partial.remove("6.bias");
    let e = kiln::checkpoint::load_stored(&partial, &smaller, None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("6.bias") && e.contains("missing"), "{e}");
    // Extra: a file with one more tensor than the model.
    let extra = Sequential::new().add(
        Conv2d::new(
            &mut Init::new(&dev(), 0),
            1,
            16,
            [3, 3],
            Conv2dOptions {
                padding: [1, 1],
                ..Default::default()
            },
            true,
        )
        .unwrap(),
    );
    std::fs::write(&path, &good).unwrap();
    let e = kiln::checkpoint::load(&path, &extra, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor 2.") && e.contains("not in the model"),
        "{e}"
    );
    // Truncated and corrupt files.
    let e = load(&good[..good.len() / 2]);
    assert!(e.contains("not a valid safetensors"), "{e}");
    let e = load(b"not a checkpoint at all");
    assert!(e.contains("not a valid safetensors"), "{e}");
    assert!(matches!(
        kiln::checkpoint::load(&dir.join("kiln-no-such-file.safetensors"), &model, None),
        Err(Error::Io { .. })
    ));
    std::fs::remove_file(&path).ok();
}

/// The streamed writer lays the file out as the safetensors crate does (spec metadata,
/// integer counters, optimizer state), and a save that fails midway leaves the old file
/// whole.
#[test]
fn streamed_saves_match_safetensors_and_fail_safely() {
    use safetensors::tensor::{Dtype, TensorView};
    let d = own_device();
    let spec = "conv2d(1,2,3) batchnorm2d(2) relu flatten linear(8,3)";
    let model = Sequential::from_spec(&mut Init::new(&d, 3), spec).unwrap();
    let mut opt = kiln::optim::Adam::new(model.parameters(), Default::default()).unwrap();
    let x = Tensor::randn(&[2, 1, 4, 4], 1, &d).unwrap();
    model
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    kiln::optim::Optimizer::step(&mut opt).unwrap();
    let ours = kiln::checkpoint::to_bytes(&model, Some(spec)).unwrap();
    let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t, _) in model.state_dict() {
        let v = t.to_vec().unwrap();
        if name.ends_with("num_batches_tracked") {
            let b = v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
            entries.push((name, Dtype::I64, t.dims().to_vec(), b));
        } else {
            entries.push((
                name,
                Dtype::F32,
                t.dims().to_vec(),
                bytemuck::cast_slice(&v).to_vec(),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = entries
        .iter()
        .map(|(n, dt, s, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    let meta = Some(
        [("kiln.spec".to_string(), spec.to_string())]
            .into_iter()
            .collect(),
    );
    let theirs = safetensors::serialize(views, meta).unwrap();
    assert!(
        ours == theirs,
        "the streamed file differs from safetensors' own layout"
    );
    // The optimizer file, read by the safetensors crate: every state tensor, the step count
    // and the learning rate.
    let opt_bytes = kiln::checkpoint::optimizer_to_bytes(&opt).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&opt_bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["kiln.optimizer.steps"], "1");
    assert_eq!(meta["kiln.optimizer.lr"], "0.001");
    let st = safetensors::SafeTensors::deserialize(&opt_bytes).unwrap();
    let state = kiln::optim::Optimizer::state(&opt);
    assert_eq!(st.len(), state.len());
    for (name, t) in state {
        let view = st.tensor(&name).unwrap();
        assert_eq!(view.shape(), t.dims(), "{name}");
        assert_eq!(
            view.data(),
            bytemuck::cast_slice::<f32, u8>(&t.to_vec().unwrap()),
            "{name}"
        );
    }
    // A save that fails midway (the device is lost while tensors are read) keeps the old file.
    let path = std::env::temp_dir().join(format!("kiln-stream-{}.safetensors", std::process::id()));
    kiln::checkpoint::save(&path, &model, Some(&opt), Some(spec)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), ours);
    let opt_path = kiln::checkpoint::optimizer_path(&path);
    assert_eq!(std::fs::read(&opt_path).unwrap(), opt_bytes);
    d.destroy();
    assert!(kiln::checkpoint::save(&path, &model, Some(&opt), Some(spec)).is_err());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        ours,
        "the old checkpoint is intact"
    );
    assert_eq!(
        std::fs::read(&opt_path).unwrap(),
        opt_bytes,
        "and the old optimizer file"
    );
    assert!(!path.with_extension("safetensors.partial").exists());
    assert!(!opt_path.with_extension("safetensors.partial").exists());
    std::fs::remove_file(&path).ok();
    std::fs::remove_file(&opt_path).ok();
}

/// A pretrained body under a new head: the non-strict load reports the new head's tensors as
/// missing and the old head's as unexpected, loads the body bit for bit, leaves the new head
/// as initialised, and the model then trains. Strict loading of the same file is an `Err` that
/// changes nothing. A shape mismatch is an `Err` either way.
#[test]
fn fine_tune_a_new_head_through_non_strict_loading() {
    use kiln::checkpoint::{load_with, LoadOptions};
    let d = dev();
    let pretrained = host_values(digits_cnn(5), 5);
    let path =
        std::env::temp_dir().join(format!("kiln-finetune-{}.safetensors", std::process::id()));
    kiln::checkpoint::save(&path, &pretrained, None, None).unwrap();
    let body = |init: &mut Init| {
        let pad1 = Conv2dOptions {
            padding: [1, 1],
            ..Default::default()
        };
        Sequential::new()
            .add(Conv2d::new(init, 1, 16, [3, 3], pad1, true).unwrap())
            .add(Relu)
            .add(Conv2d::new(init, 16, 32, [3, 3], pad1, true).unwrap())
            .add(Relu)
            .add(MaxPool2d(Pool2dOptions::new([2, 2])))
            .add(Flatten::default())
            .add(Linear::new(init, 512, 64, true).unwrap())
            .add(Relu)
            .add_named("head", Linear::new(init, 64, 3, true).unwrap())
    };
    let model = body(&mut Init::new(&d, 11));
    let head_before = model.state_dict()[6].1.to_vec().unwrap();
    let before: Vec<Vec<f32>> = model
        .state_dict()
        .iter()
        .map(|(_, t, _)| t.to_vec().unwrap())
        .collect();
    let e = kiln::checkpoint::load(&path, &model, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing") || e.contains("not in the model"),
        "{e}"
    );
    let now: Vec<Vec<f32>> = model
        .state_dict()
        .iter()
        .map(|(_, t, _)| t.to_vec().unwrap())
        .collect();
    assert_eq!(before, now, "a failed strict load changes nothing");
    let report = load_with(&path, &model, None, &LoadOptions { strict: false }).unwrap();
    assert_eq!(report.missing, ["head.bias", "head.weight"]);
    assert_eq!(report.unexpected, ["8.bias", "8.weight"]);
    let want: std::collections::HashMap<String, Vec<f32>> = pretrained
        .state_dict()
        .into_iter()
        .map(|(n, t, _)| (n, t.to_vec().unwrap()))
        .collect();
    for (name, t, _) in model.state_dict() {
        if name.starts_with("head.") {
            continue;
        }
        assert_eq!(t.to_vec().unwrap(), want[&name], "{name} loaded");
    }
    assert_eq!(
        model.state_dict()[6].1.to_vec().unwrap(),
        head_before,
        "the new head is as initialised"
    );
    // It fine-tunes: three Adam steps lower the loss on a batch of three classes.
    let mut opt = Adam::new(
        model.parameters(),
        AdamOptions {
            lr: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let x = digits_batch();
    let t = Tensor::from_slice(&[0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0], &[8], &d).unwrap();
    let loss = |m: &Sequential| {
        kiln::loss::cross_entropy(&m.forward(&x).unwrap(), &t, &Default::default()).unwrap()
    };
    let first = loss(&model).to_scalar().unwrap();
    for _ in 0..3 {
        let l = loss(&model);
        opt.zero_grad();
        l.backward().unwrap();
        opt.step().unwrap();
    }
    let last = loss(&model).to_scalar().unwrap();
    assert!(last < first, "fine-tuning: loss {first} -> {last}");
    // A tensor of another shape under a known name is an Err even when not strict.
    let wrong = Sequential::new().add(Linear::new(&mut Init::new(&d, 0), 3, 16, true).unwrap());
    let e = load_with(&path, &wrong, None, &LoadOptions { strict: false })
        .unwrap_err()
        .to_string();
    assert!(e.contains("0.weight") && e.contains("shape"), "{e}");
    std::fs::remove_file(&path).ok();
}

/// The weights file of a checkpoint saved with an optimizer holds exactly the state dict
/// (PyTorch's strict `load_state_dict` takes it); the optimizer file beside it restores the
/// state, the step count and the learning rate; a save without an optimizer removes a stale
/// optimizer file; a load that asks for optimizer state where there is none is an `Err`.
#[test]
fn optimizer_state_lives_beside_the_weights_and_resumes_steps_and_lr() {
    let d = dev();
    let model = digits_bn(6);
    let mut opt = Adam::new(model.parameters(), AdamOptions::default()).unwrap();
    let x = digits_batch();
    let t = Tensor::from_slice(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &[8], &d).unwrap();
    for _ in 0..3 {
        let l = kiln::loss::cross_entropy(&model.forward(&x).unwrap(), &t, &Default::default())
            .unwrap();
        opt.zero_grad();
        l.backward().unwrap();
        opt.step().unwrap();
    }
    opt.set_lr(0.000_337_5);
    let path = std::env::temp_dir().join(format!("kiln-resume-{}.safetensors", std::process::id()));
    kiln::checkpoint::save(&path, &model, Some(&opt), None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want: Vec<String> = model.state_dict().into_iter().map(|(n, _, _)| n).collect();
    want.sort();
    assert_eq!(names, want, "the weights file holds exactly the state dict");
    let opt_path = kiln::checkpoint::optimizer_path(&path);
    assert!(opt_path
        .to_string_lossy()
        .ends_with(".optimizer.safetensors"));
    let copy = digits_bn(7);
    let mut copy_opt = Adam::new(copy.parameters(), AdamOptions::default()).unwrap();
    kiln::checkpoint::load(&path, &copy, Some(&mut copy_opt)).unwrap();
    assert_eq!(copy_opt.steps(), 3, "step count restored");
    assert_eq!(copy_opt.lr(), 0.000_337_5, "learning rate restored");
    assert_same_state(&model, &opt, &copy, &copy_opt);
    // Without an optimizer, the stale optimizer file goes, and asking for one is an Err.
    kiln::checkpoint::save(&path, &model, None, None).unwrap();
    assert!(!opt_path.exists(), "stale optimizer state removed");
    let mut third = Adam::new(copy.parameters(), AdamOptions::default()).unwrap();
    let e = kiln::checkpoint::load(&path, &copy, Some(&mut third))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no optimizer state"), "{e}");
    std::fs::remove_file(&path).ok();
}

/// Raw named tensors: a round trip of odd shapes and names, and a file of another writer
/// (the safetensors crate, with f64 and i32 tensors) read into f32 tensors.
#[test]
fn save_and_load_raw_tensors() {
    use safetensors::tensor::{Dtype, TensorView};
    let d = dev();
    let mut rng = Rng::new(4);
    let a = Tensor::from_slice(&rng.vec(35, -1.0, 1.0), &[5, 7], &d).unwrap();
    let b = Tensor::from_slice(&rng.vec(3, -1.0, 1.0), &[3], &d).unwrap();
    let s = Tensor::scalar(2.5, &d).unwrap();
    let path = std::env::temp_dir().join(format!("kiln-raw-{}.safetensors", std::process::id()));
    kiln::checkpoint::save_tensors(
        &path,
        &[
            ("layer/a", &a),
            ("b", &b),
            ("at", &a.t().unwrap()),
            ("scale", &s),
        ],
    )
    .unwrap();
    let back = kiln::checkpoint::load_tensors(&path, &d).unwrap();
    let at = a.t().unwrap();
    assert_eq!(back.len(), 4);
    for (name, t) in [("layer/a", &a), ("b", &b), ("scale", &s), ("at", &at)] {
        assert_eq!(back[name].dims(), t.dims(), "{name}");
        assert_eq!(back[name].to_vec().unwrap(), t.to_vec().unwrap(), "{name}");
    }
    assert!(
        kiln::checkpoint::save_tensors(&path, &[("x", &a), ("x", &b)]).is_err(),
        "a name twice"
    );
    let f64s: Vec<u8> = [1.5f64, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let i32s: Vec<u8> = [7i32, -3, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "d".to_string(),
            TensorView::new(Dtype::F64, vec![2], &f64s).unwrap(),
        ),
        (
            "i".to_string(),
            TensorView::new(Dtype::I32, vec![3, 1], &i32s).unwrap(),
        ),
    ];
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let back = kiln::checkpoint::load_tensors(&path, &d).unwrap();
    assert_eq!(back["d"].to_vec().unwrap(), vec![1.5, -2.0]);
    assert_eq!(
        (back["i"].dims(), back["i"].to_vec().unwrap()),
        (&[3, 1][..], vec![7.0, -3.0, 0.0])
    );
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(kiln::checkpoint::load_tensors(&path, &d).is_err());
    std::fs::remove_file(&path).ok();
}

/// A checkpoint of an earlier kiln version, with the optimizer state inside the weights file
/// under `optimizer.`, still loads (model and optimizer state).
#[test]
fn files_with_the_optimizer_inside_still_load() {
    let model = digits_bn(8);
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    let l = model
        .forward(&digits_batch())
        .unwrap()
        .square()
        .unwrap()
        .sum_all()
        .unwrap();
    l.backward().unwrap();
    opt.step().unwrap();
    let mut tensors: Vec<(String, Tensor)> = model
        .state_dict()
        .into_iter()
        .map(|(n, t, _)| (n, t))
        .collect();
    tensors.extend(
        opt.state()
            .into_iter()
            .map(|(n, t)| (format!("optimizer.{n}"), t)),
    );
    let path = std::env::temp_dir().join(format!("kiln-legacy-{}.safetensors", std::process::id()));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    kiln::checkpoint::save_tensors(&path, &refs).unwrap();
    let copy = digits_bn(9);
    let mut copy_opt = Sgd::new(
        copy.parameters(),
        SgdOptions {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    kiln::checkpoint::load(&path, &copy, Some(&mut copy_opt)).unwrap();
    std::fs::remove_file(&path).ok();
    let (sa, sb) = (opt.state(), copy_opt.state());
    assert_eq!(sa.len(), sb.len());
    for ((n, a), (_, b)) in sa.iter().zip(&sb) {
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{n}");
    }
    for ((n, a, _), (_, b, _)) in model.state_dict().iter().zip(copy.state_dict().iter()) {
        assert!(
            n.ends_with("num_batches_tracked") || a.to_vec().unwrap() == b.to_vec().unwrap(),
            "{n}"
        );
    }
}
