//! The training module: modules, initialisation, train/eval, data loading, the fit loop.

mod common;

use common::*;
use kiln::data::{DataLoader, Dataset, InMemoryDataset};
use kiln::nn::{
    BatchNorm, Dropout, Embedding, Init, LayerNorm, Linear, Module, Relu, Sequential, TensorRole,
};
use kiln::optim::{Optimizer, Sgd, SgdOptions};
use kiln::train::{fit, FitOptions};
use kiln::{Result, Tensor};

#[test]
fn names_follow_pytorch_state_dict() {
    let d = dev();
    let mut init = Init::new(&d, 0);
    let features = Sequential::new()
        .add(Linear::new(&mut init, 3, 4, true).unwrap())
        .add(BatchNorm::new_1d(&mut init, 4).unwrap());
    let net = Sequential::new()
        .add_named("features", features)
        .add_named("act", Relu)
        .add_named("classifier", Linear::new(&mut init, 4, 2, false).unwrap());
    let names: Vec<(String, TensorRole)> = net
        .state_dict()
        .into_iter()
        .map(|(n, _, r)| (n, r))
        .collect();
    let want = [
        ("features.0.weight", TensorRole::Parameter),
        ("features.0.bias", TensorRole::Parameter),
        ("features.1.weight", TensorRole::Parameter),
        ("features.1.bias", TensorRole::Parameter),
        ("features.1.running_mean", TensorRole::Buffer),
        ("features.1.running_var", TensorRole::Buffer),
        ("features.1.num_batches_tracked", TensorRole::Buffer),
        ("classifier.weight", TensorRole::Parameter),
    ];
    assert_eq!(names, want.map(|(n, r)| (n.to_string(), r)));
    assert_eq!(net.parameters().len(), 5);
    assert!(net.describe().contains("Linear(3 -> 4)"));
}

#[test]
fn initialisation_is_seeded_and_follows_pytorch_bounds() {
    let d = dev();
    let a = Linear::new(&mut Init::new(&d, 7), 300, 200, true).unwrap();
    let b = Linear::new(&mut Init::new(&d, 7), 300, 200, true).unwrap();
    let c = Linear::new(&mut Init::new(&d, 8), 300, 200, true).unwrap();
    let wa = a.weight.to_vec().unwrap();
    assert_eq!(wa, b.weight.to_vec().unwrap());
    assert_ne!(wa, c.weight.to_vec().unwrap());
    // kaiming_uniform(a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance bound^2 / 3.
    let bound = 1.0 / 300f32.sqrt();
    assert!(wa.iter().all(|w| w.abs() <= bound));
    let var = wa.iter().map(|w| (w * w) as f64).sum::<f64>() / wa.len() as f64;
    assert!(
        (var / (bound as f64 * bound as f64 / 3.0) - 1.0).abs() < 0.05,
        "variance {var}"
    );
    assert!(a
        .bias
        .as_ref()
        .unwrap()
        .to_vec()
        .unwrap()
        .iter()
        .all(|b| b.abs() <= bound));
    let bn = BatchNorm::new_2d(&mut Init::new(&d, 0), 3).unwrap();
    assert_eq!(bn.weight.as_ref().unwrap().to_vec().unwrap(), vec![1.0; 3]);
    assert_eq!(bn.running_var.to_vec().unwrap(), vec![1.0; 3]);
    let ln = LayerNorm::new(&mut Init::new(&d, 0), &[4]).unwrap();
    assert_eq!(ln.bias.as_ref().unwrap().to_vec().unwrap(), vec![0.0; 4]);
    let e = Embedding::new(&mut Init::new(&d, 0), 100, 50)
        .unwrap()
        .weight
        .to_vec()
        .unwrap();
    let m = e.iter().map(|&v| v as f64).sum::<f64>() / e.len() as f64;
    let v = e.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / e.len() as f64;
    assert!(
        m.abs() < 0.05 && (v - 1.0).abs() < 0.05,
        "embedding N(0, 1): mean {m} var {v}"
    );
}

#[test]
fn train_and_eval_modes() {
    let d = dev();
    let mut init = Init::new(&d, 0);
    let mut net = Sequential::new()
        .add(Dropout::new(&mut init, 0.5).unwrap())
        .add(BatchNorm::new_1d(&mut init, 4).unwrap());
    let x = Tensor::randn(&[16, 4], 3, &d)
        .unwrap()
        .mul_scalar(3.0)
        .unwrap()
        .add_scalar(2.0)
        .unwrap();
    let y1 = net.forward(&x).unwrap().to_vec().unwrap();
    let y2 = net.forward(&x).unwrap().to_vec().unwrap();
    assert_ne!(y1, y2, "a new dropout mask each call in training");
    net.set_training(false);
    let e1 = net.forward(&x).unwrap().to_vec().unwrap();
    assert_eq!(
        e1,
        net.forward(&x).unwrap().to_vec().unwrap(),
        "deterministic in eval"
    );
    // In eval, batch norm uses the running statistics (updated twice, momentum 0.1).
    let rm = net
        .state_dict()
        .into_iter()
        .find(|(n, _, _)| n == "1.running_mean")
        .unwrap()
        .1
        .to_vec()
        .unwrap();
    assert!(
        rm.iter().all(|&m| m > 0.1 && m < 1.0),
        "running mean moved towards 2: {rm:?}"
    );
    let counter = net
        .state_dict()
        .into_iter()
        .find(|(n, _, _)| n.ends_with("num_batches_tracked"))
        .unwrap()
        .1;
    assert_eq!(counter.to_scalar().unwrap(), 2.0);
    // An input of the wrong shape is an error.
    assert!(net.forward(&Tensor::ones(&[4, 5], &d).unwrap()).is_err());
    assert!(Linear::new(&mut init, 3, 2, true)
        .unwrap()
        .forward(&Tensor::ones(&[4, 5], &d).unwrap())
        .is_err());
}

fn toy(n: usize) -> InMemoryDataset {
    let features: Vec<f32> = (0..n * 2).map(|i| i as f32).collect();
    InMemoryDataset::new(features, (0..n).map(|i| i % 3).collect(), &[2], 3).unwrap()
}

#[test]
fn loader_batches_shuffles_and_drops() {
    let d = dev();
    let data = toy(10);
    let plain = DataLoader::new(&data, 4, &d);
    let sizes: Vec<usize> = plain.epoch(0).map(|b| b.unwrap().labels.len()).collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    let first = plain.epoch(0).next().unwrap().unwrap();
    assert_eq!(
        first.inputs.to_vec().unwrap(),
        (0..8).map(|v| v as f32).collect::<Vec<_>>()
    );
    assert_eq!(first.targets.to_vec().unwrap(), vec![0.0, 1.0, 2.0, 0.0]);
    let dropping = DataLoader::new(&data, 4, &d).drop_last(true);
    assert_eq!(dropping.len(), 2);
    let order = |loader: &DataLoader, epoch| -> Vec<f32> {
        loader
            .epoch(epoch)
            .flat_map(|b| b.unwrap().inputs.to_vec().unwrap().into_iter().step_by(2))
            .collect()
    };
    let shuffled = DataLoader::new(&data, 3, &d).shuffle(9);
    let e0 = order(&shuffled, 0);
    assert_eq!(
        e0,
        order(&DataLoader::new(&data, 3, &d).shuffle(9), 0),
        "seeded"
    );
    assert_ne!(e0, order(&shuffled, 1), "a new order each epoch");
    let mut sorted = e0.clone();
    sorted.sort_by(f32::total_cmp);
    assert_eq!(
        sorted,
        (0..10).map(|i| (2 * i) as f32).collect::<Vec<_>>(),
        "every sample once"
    );
    let (a, b) = data.split(0.7, 1).unwrap();
    assert_eq!((a.len(), b.len()), (7, 3));
}

/// A dataset whose labels are wrong, as user data can be.
struct BadLabels;

impl Dataset for BadLabels {
    fn len(&self) -> usize {
        4
    }
    fn feature_shape(&self) -> Vec<usize> {
        vec![1]
    }
    fn num_classes(&self) -> usize {
        2
    }
    fn read(&self, index: usize, features: &mut Vec<f32>) -> Result<usize> {
        features.push(index as f32);
        Ok(index)
    }
}

#[test]
fn out_of_range_labels_are_err() {
    let loader = DataLoader::new(&BadLabels, 4, &dev());
    let e = loader.epoch(0).next().unwrap().err().unwrap().to_string();
    assert!(e.contains("label 2") && e.contains("2 classes"), "{e}");
    assert!(InMemoryDataset::new(vec![0.0; 2], vec![0, 5], &[1], 3).is_err());
    assert!(InMemoryDataset::new(vec![0.0; 3], vec![0, 1], &[1], 3).is_err());
}

#[test]
fn thousand_training_steps_keep_memory_flat() {
    let d = own_device();
    let mut init = Init::new(&d, 0);
    let net = Sequential::new()
        .add(Linear::new(&mut init, 8, 16, true).unwrap())
        .add(Relu)
        .add(Linear::new(&mut init, 16, 3, true).unwrap());
    let mut opt = Sgd::new(
        net.parameters(),
        SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    let x = Tensor::randn(&[32, 8], 1, &d).unwrap();
    let t = Tensor::from_slice(
        &(0..32).map(|i| (i % 3) as f32).collect::<Vec<_>>(),
        &[32],
        &d,
    )
    .unwrap();
    let step = |opt: &mut Sgd| {
        let loss =
            kiln::loss::cross_entropy(&net.forward(&x).unwrap(), &t, &Default::default()).unwrap();
        opt.zero_grad();
        loss.backward().unwrap();
        opt.step().unwrap();
    };
    step(&mut opt);
    d.synchronize().unwrap();
    let after_first = d.live_bytes();
    for _ in 1..1000 {
        step(&mut opt);
    }
    d.synchronize().unwrap();
    assert_eq!(d.live_bytes(), after_first);
    assert_eq!(d.stats().readbacks, 0, "training steps read nothing back");
    let loss = kiln::loss::cross_entropy(&net.forward(&x).unwrap(), &t, &Default::default())
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(loss < 0.5, "the loop trained: loss {loss}");
}

#[test]
fn fit_reports_and_stops_on_a_non_finite_loss() {
    let d = dev();
    let n = 40;
    let mut feats: Vec<f32> = (0..n * 2).map(|i| ((i * 37) % 11) as f32 / 11.0).collect();
    let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
    let good = InMemoryDataset::new(feats.clone(), labels.clone(), &[2], 2).unwrap();
    let mut init = Init::new(&d, 0);
    let mut net = Sequential::new().add(Linear::new(&mut init, 2, 2, true).unwrap());
    let mut opt = Sgd::new(
        net.parameters(),
        SgdOptions {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let train = DataLoader::new(&good, 8, &d);
    let mut log = Vec::new();
    let reports = fit(
        &mut net,
        &mut opt,
        &train,
        Some(&train),
        FitOptions {
            epochs: 2,
            progress: Some(&mut log),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.train_loss.is_finite()
        && (0.0..=1.0).contains(&r.train_accuracy)
        && r.eval_accuracy.is_some()));
    let text = String::from_utf8(log).unwrap();
    assert!(
        text.contains("epoch   2/2") && text.contains("eval loss"),
        "{text}"
    );
    // Sample 20 (step 3 of batches of 8) holds a NaN.
    feats[40] = f32::NAN;
    let bad = InMemoryDataset::new(feats, labels, &[2], 2).unwrap();
    let mut net = Sequential::new().add(Linear::new(&mut init, 2, 2, true).unwrap());
    let mut opt = Sgd::new(net.parameters(), SgdOptions::default()).unwrap();
    let e = fit(
        &mut net,
        &mut opt,
        &DataLoader::new(&bad, 8, &d),
        None,
        FitOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("NaN") && e.contains("step 3"), "{e}");
}

#[test]
fn mnist_reader_reads_idx_files() {
    let dir = std::env::temp_dir().join(format!("kiln-mnist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let images = |n: u32| {
        let mut v = vec![0, 0, 8, 3];
        for d in [n, 28, 28] {
            v.extend(d.to_be_bytes());
        }
        v.extend((0..n * 784).map(|i| (i % 256) as u8));
        v
    };
    let labels = |n: u32| {
        let mut v = vec![0, 0, 8, 1];
        v.extend(n.to_be_bytes());
        v.extend((0..n).map(|i| (i % 10) as u8));
        v
    };
    std::fs::write(dir.join("train-images-idx3-ubyte"), images(3)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), labels(3)).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), images(2)).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), labels(2)).unwrap();
    let (train, test) = kiln::data::mnist(&dir).unwrap();
    assert_eq!(
        (train.len(), test.len(), train.feature_shape()),
        (3, 2, vec![1, 28, 28])
    );
    assert_eq!(train.label(2), 2);
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), &labels(2)[..9]).unwrap();
    assert!(kiln::data::mnist(&dir).is_err(), "truncated file");
    std::fs::remove_dir_all(&dir).ok();
}

/// A training step of the example CNN records its work without waiting: at most one queue
/// submit (when the batch bound is reached) and no readback unless the loss is read.
#[test]
fn a_training_step_submits_at_most_once_and_reads_nothing() {
    let d = own_device();
    let spec = "conv2d(1,16,3,p=1) relu conv2d(16,32,3,p=1) relu maxpool2d(2) flatten linear(512,64) relu linear(64,10)";
    let net = Sequential::from_spec(&mut Init::new(&d, 0), spec).unwrap();
    let mut opt = Sgd::new(
        net.parameters(),
        SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    let x = Tensor::randn(&[64, 1, 8, 8], 1, &d).unwrap();
    let t = Tensor::from_slice(
        &(0..64).map(|i| (i % 10) as f32).collect::<Vec<_>>(),
        &[64],
        &d,
    )
    .unwrap();
    let mut last_loss = None;
    // The first step compiles pipelines and may time candidate kernels (the autotuner
    // synchronises); the steps after it are the steady state.
    for i in 0..6 {
        let before = d.stats();
        let loss =
            kiln::loss::cross_entropy(&net.forward(&x).unwrap(), &t, &Default::default()).unwrap();
        opt.zero_grad();
        loss.backward().unwrap();
        opt.step().unwrap();
        let after = d.stats();
        assert_eq!(after.readbacks, before.readbacks, "no readback in a step");
        if i > 0 {
            assert!(
                after.submits - before.submits <= 1,
                "{} submits in one step",
                after.submits - before.submits
            );
        }
        last_loss = Some(loss);
    }
    let before = d.stats().readbacks;
    assert!(last_loss.unwrap().to_scalar().unwrap().is_finite());
    assert_eq!(
        d.stats().readbacks,
        before + 1,
        "reading the loss is the one readback"
    );
}
