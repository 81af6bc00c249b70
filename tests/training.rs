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
    let text = net.describe();
    assert!(text.contains("Linear(3 -> 4)"), "{text}");
    // 3x4 + 4 (linear), 4 + 4 (batch norm), 4x2 (classifier): 32.
    assert_eq!(net.parameter_count(), 32);
    assert!(
        text.ends_with("# 32 parameters") && text.contains("# 24 parameters"),
        "{text}"
    );
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

/// BatchNorm1d against an f64 reference: two training steps (batch statistics, biased variance
/// in the output, running statistics with momentum 0.1 and the unbiased variance), then eval
/// mode (the running statistics), with a non-trivial weight and bias.
#[test]
fn batch_norm_1d_matches_an_f64_reference() {
    let d = dev();
    let (batch, c) = (7, 5);
    let mut bn = BatchNorm::new_1d(&mut Init::new(&d, 0), c).unwrap();
    let mut rng = Rng::new(31);
    let gamma = rng.vec(c, 0.5, 1.5);
    let beta = rng.vec(c, -0.5, 0.5);
    let set = |t: &Tensor, v: &[f32]| {
        t.assign(&Tensor::from_slice(v, &[c], &d).unwrap()).unwrap();
    };
    set(bn.weight.as_ref().unwrap(), &gamma);
    set(bn.bias.as_ref().unwrap(), &beta);
    let eps = bn.eps as f64;
    let (mut rm, mut rv) = (vec![0f64; c], vec![1f64; c]);
    let normalise = |x: &[f32], mean: &[f64], var: &[f64]| -> Vec<f64> {
        (0..batch * c)
            .map(|i| {
                let j = i % c;
                (x[i] as f64 - mean[j]) / (var[j] + eps).sqrt() * gamma[j] as f64 + beta[j] as f64
            })
            .collect()
    };
    for step in 0..2 {
        let x: Vec<f32> = rng.vec(batch * c, -1.0, 3.0);
        let got = bn
            .forward(&Tensor::from_slice(&x, &[batch, c], &d).unwrap())
            .unwrap();
        let mean: Vec<f64> = (0..c)
            .map(|j| (0..batch).map(|b| x[b * c + j] as f64).sum::<f64>() / batch as f64)
            .collect();
        let ss: Vec<f64> = (0..c)
            .map(|j| {
                (0..batch)
                    .map(|b| (x[b * c + j] as f64 - mean[j]).powi(2))
                    .sum()
            })
            .collect();
        let biased: Vec<f64> = ss.iter().map(|s| s / batch as f64).collect();
        assert_close(
            &format!("training output, step {step}"),
            &got,
            &Nd::new(&[batch, c], normalise(&x, &mean, &biased)),
            1e-5,
            1e-4,
        );
        for j in 0..c {
            rm[j] = 0.9 * rm[j] + 0.1 * mean[j];
            rv[j] = 0.9 * rv[j] + 0.1 * ss[j] / (batch - 1) as f64;
        }
    }
    assert_close(
        "running mean",
        &bn.running_mean,
        &Nd::new(&[c], rm.clone()),
        1e-6,
        1e-5,
    );
    assert_close(
        "running var",
        &bn.running_var,
        &Nd::new(&[c], rv.clone()),
        1e-6,
        1e-5,
    );
    bn.set_training(false);
    let x = rng.vec(batch * c, -1.0, 3.0);
    let got = bn
        .forward(&Tensor::from_slice(&x, &[batch, c], &d).unwrap())
        .unwrap();
    assert_close(
        "eval output",
        &got,
        &Nd::new(&[batch, c], normalise(&x, &rm, &rv)),
        1e-5,
        1e-4,
    );
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
            lr: 1.0,
            ..Default::default()
        },
    )
    .unwrap();
    let train = DataLoader::new(&good, 8, &d);
    let mut w: Vec<f64> = net.parameters()[0]
        .to_vec()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut bias: Vec<f64> = net.parameters()[1]
        .to_vec()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
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
    // The same two epochs in f64: per batch of 8, the loss and accuracy before the SGD step,
    // then the step; after each epoch, loss and accuracy over the set with the new weights.
    let logits = |w: &[f64], b: &[f64], i: usize| -> [f64; 2] {
        let x = [feats[2 * i] as f64, feats[2 * i + 1] as f64];
        [0, 1].map(|o| w[2 * o] * x[0] + w[2 * o + 1] * x[1] + b[o])
    };
    let ce = |z: [f64; 2], t: usize| {
        let m = z[0].max(z[1]);
        m + ((z[0] - m).exp() + (z[1] - m).exp()).ln() - z[t]
    };
    let right = |z: [f64; 2], t: usize| usize::from((z[1] > z[0]) as usize == t);
    for report in &reports {
        let (mut loss, mut correct) = (0.0, 0);
        for start in (0..n).step_by(8) {
            let (mut gw, mut gb) = (vec![0.0; 4], vec![0.0; 2]);
            for i in start..start + 8 {
                let z = logits(&w, &bias, i);
                loss += ce(z, labels[i]);
                correct += right(z, labels[i]);
                let m = z[0].max(z[1]);
                let e = [(z[0] - m).exp(), (z[1] - m).exp()];
                for o in 0..2 {
                    let g = (e[o] / (e[0] + e[1]) - f64::from(u8::from(o == labels[i]))) / 8.0;
                    gw[2 * o] += g * feats[2 * i] as f64;
                    gw[2 * o + 1] += g * feats[2 * i + 1] as f64;
                    gb[o] += g;
                }
            }
            w.iter_mut().zip(&gw).for_each(|(w, g)| *w -= 1.0 * g);
            bias.iter_mut().zip(&gb).for_each(|(b, g)| *b -= 1.0 * g);
        }
        let near = |what: &str, got: f32, want: f64| {
            assert!(
                (got as f64 - want).abs() <= 2e-6 + 1e-5 * want.abs(),
                "epoch {}: {what} {got}, want {want}",
                report.epoch
            );
        };
        near("train loss", report.train_loss, loss / n as f64);
        near(
            "train accuracy",
            report.train_accuracy.unwrap(),
            correct as f64 / n as f64,
        );
        let eval_loss: f64 = (0..n).map(|i| ce(logits(&w, &bias, i), labels[i])).sum();
        let eval_right: usize = (0..n).map(|i| right(logits(&w, &bias, i), labels[i])).sum();
        near("eval loss", report.eval_loss.unwrap(), eval_loss / n as f64);
        near(
            "eval accuracy",
            report.eval_accuracy.unwrap(),
            eval_right as f64 / n as f64,
        );
    }
    let text = String::from_utf8(log).unwrap();
    assert!(
        text.contains("epoch   2/2") && text.contains("eval loss"),
        "{text}"
    );
    // A log gets one line per epoch; the live bar (stderr on a terminal) never writes there.
    assert_eq!(text.lines().count(), 2, "{text:?}");
    assert!(!text.contains('\r'), "{text:?}");
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

/// A model with the wrong number of outputs for the dataset (1 for 2 classes, or 3) is an
/// `Err` at the first batch of `fit` and of `evaluate`, naming the shapes, before any step.
#[test]
fn fit_refuses_logits_of_the_wrong_class_count() {
    let d = dev();
    let data = toy(12);
    let loader = DataLoader::new(&data, 4, &d);
    for outputs in [1, 2, 4] {
        let mut net =
            Sequential::new().add(Linear::new(&mut Init::new(&d, 0), 2, outputs, true).unwrap());
        let before: Vec<Vec<f32>> = net
            .parameters()
            .iter()
            .map(|p| p.to_vec().unwrap())
            .collect();
        let mut opt = Sgd::new(net.parameters(), SgdOptions::default()).unwrap();
        let e = fit(&mut net, &mut opt, &loader, None, FitOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("[4, {outputs}]")) && e.contains("(4, 3)"),
            "{e}"
        );
        assert_eq!(opt.steps(), 0, "no step taken");
        let after: Vec<Vec<f32>> = net
            .parameters()
            .iter()
            .map(|p| p.to_vec().unwrap())
            .collect();
        assert_eq!(before, after);
        let e = kiln::train::evaluate(&mut net, &loader)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(4, 3)"), "{e}");
    }
}

/// Regression through `fit`: a linear model on tensor targets with an MSE loss closure, two
/// epochs of SGD recomputed in f64 (epoch losses on the training and evaluation sets), no
/// accuracy; a loss closure that does not return one element is an `Err`.
#[test]
fn fit_regresses_tensor_targets_with_a_loss_closure() {
    use kiln::data::TensorDataset;
    use kiln::loss::{mse_loss, Reduction};
    let d = dev();
    let n = 40;
    let feats: Vec<f32> = (0..n * 2)
        .map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.5)
        .collect();
    let targets: Vec<f32> = (0..n)
        .map(|i| 2.0 * feats[2 * i] - 3.0 * feats[2 * i + 1] + 0.5 + ((i * 7) % 5) as f32 * 0.01)
        .collect();
    let data = TensorDataset::new(feats.clone(), &[2], targets.clone(), &[1]).unwrap();
    let loader = DataLoader::new(&data, 8, &d);
    let mut net = Sequential::new().add(Linear::new(&mut Init::new(&d, 0), 2, 1, true).unwrap());
    let mut w: Vec<f64> = net.parameters()[0]
        .to_vec()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut b = net.parameters()[1].to_vec().unwrap()[0] as f64;
    let mut opt = Sgd::new(
        net.parameters(),
        SgdOptions {
            lr: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    let mse = |y: &Tensor, t: &Tensor| mse_loss(y, t, Reduction::Mean);
    let reports = fit(
        &mut net,
        &mut opt,
        &loader,
        Some(&loader),
        FitOptions {
            epochs: 2,
            loss: Some(&mse),
            ..Default::default()
        },
    )
    .unwrap();
    let predict = |w: &[f64], b: f64, i: usize| {
        w[0] * feats[2 * i] as f64 + w[1] * feats[2 * i + 1] as f64 + b
    };
    for report in &reports {
        let mut loss = 0.0;
        for start in (0..n).step_by(8) {
            let (mut gw, mut gb) = ([0.0; 2], 0.0);
            for i in start..start + 8 {
                let e = predict(&w, b, i) - targets[i] as f64;
                loss += e * e;
                gw[0] += 2.0 * e * feats[2 * i] as f64 / 8.0;
                gw[1] += 2.0 * e * feats[2 * i + 1] as f64 / 8.0;
                gb += 2.0 * e / 8.0;
            }
            w[0] -= 0.5 * gw[0];
            w[1] -= 0.5 * gw[1];
            b -= 0.5 * gb;
        }
        let eval: f64 = (0..n)
            .map(|i| (predict(&w, b, i) - targets[i] as f64).powi(2))
            .sum::<f64>()
            / n as f64;
        let near = |what: &str, got: f32, want: f64| {
            assert!(
                (got as f64 - want).abs() <= 2e-6 + 1e-5 * want.abs(),
                "epoch {}: {what} {got}, want {want}",
                report.epoch
            );
        };
        near("train loss", report.train_loss, loss / n as f64);
        near("eval loss", report.eval_loss.unwrap(), eval);
        assert_eq!((report.train_accuracy, report.eval_accuracy), (None, None));
    }
    assert!(reports[1].train_loss < reports[0].train_loss);
    // A loss of more than one element is an Err naming its shape.
    let per_element = |y: &Tensor, t: &Tensor| mse_loss(y, t, Reduction::None);
    let e = fit(
        &mut net,
        &mut opt,
        &loader,
        None,
        FitOptions {
            loss: Some(&per_element),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("one element") && e.contains("[8, 1]"), "{e}");
    // Per-token targets: each sample's target is a tensor of its own shape.
    let seq = TensorDataset::new(
        vec![0.0; 12],
        &[2, 2],
        (0..9).map(|v| v as f32).collect(),
        &[3],
    )
    .unwrap();
    let batch = DataLoader::new(&seq, 2, &d)
        .epoch(0)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        (batch.inputs.dims(), batch.targets.dims(), batch.len),
        (&[2, 2, 2][..], &[2, 3][..], 2)
    );
    assert_eq!(
        batch.targets.to_vec().unwrap(),
        vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
    assert!(TensorDataset::new(vec![0.0; 12], &[2, 2], vec![0.0; 8], &[3]).is_err());
}

/// Per-step schedules (a warm-up chained to a cosine decay, counted across epochs), the
/// per-step loss history, early stopping on a stalled evaluation loss, and save-best.
#[test]
fn fit_schedules_steps_stops_early_and_saves_the_best() {
    use kiln::optim::{Chained, CosineAnnealing, LinearWarmup, LrSchedule};
    use kiln::train::EarlyStopping;
    let d = dev();
    let data = toy(40);
    let loader = DataLoader::new(&data, 8, &d);
    let mut net = Sequential::new().add(Linear::new(&mut Init::new(&d, 0), 2, 3, true).unwrap());
    let mut opt = Sgd::new(
        net.parameters(),
        SgdOptions {
            lr: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let warm = LinearWarmup {
        base_lr: 0.01,
        start_factor: 0.1,
        end_factor: 1.0,
        total_iters: 4,
    };
    let cos = CosineAnnealing {
        base_lr: 0.01,
        t_max: 11,
        eta_min: 0.001,
    };
    let schedule = Chained {
        first: &warm,
        switch_at: 4,
        then: &cos,
    };
    let path = std::env::temp_dir().join(format!("kiln-best-{}.safetensors", std::process::id()));
    let reports = fit(
        &mut net,
        &mut opt,
        &loader,
        Some(&loader),
        FitOptions {
            epochs: 3,
            step_schedule: Some(&schedule),
            save_best: Some(&path),
            ..Default::default()
        },
    )
    .unwrap();
    // 3 epochs of 5 steps: the last step ran at step 14 of the chained schedule.
    assert_eq!(opt.lr(), schedule.lr_at(14));
    assert_eq!(opt.steps(), 15);
    for r in &reports {
        assert_eq!(r.step_losses.len(), 5);
        let mean = r.step_losses.iter().sum::<f32>() / 5.0;
        assert!(
            (mean - r.train_loss).abs() <= 1e-5 * r.train_loss.abs(),
            "{mean} vs {}",
            r.train_loss
        );
    }
    // Best epochs are those whose evaluation loss is below every earlier one; the file holds
    // the model as it was after the last of them.
    let mut lowest = f32::INFINITY;
    for r in &reports {
        let l = r.eval_loss.unwrap();
        assert_eq!(r.best, l < lowest, "epoch {}", r.epoch);
        lowest = lowest.min(l);
    }
    let last_best = reports.iter().rposition(|r| r.best).unwrap();
    assert_eq!(last_best, 2, "the loss fell every epoch: {reports:?}");
    let copy = Sequential::new().add(Linear::new(&mut Init::new(&d, 9), 2, 3, true).unwrap());
    let mut copy_opt = Sgd::new(copy.parameters(), SgdOptions::default()).unwrap();
    kiln::checkpoint::load(&path, &copy, Some(&mut copy_opt)).unwrap();
    for (a, b) in net.parameters().iter().zip(copy.parameters()) {
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap());
    }
    assert_eq!(copy_opt.steps(), 15);
    std::fs::remove_file(&path).ok();
    std::fs::remove_file(kiln::checkpoint::optimizer_path(&path)).ok();
    // A learning rate of 0 leaves the evaluation loss where it is: patience 2 stops after the
    // first epoch and two without improvement.
    let mut frozen = Sgd::new(
        net.parameters(),
        SgdOptions {
            lr: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let reports = fit(
        &mut net,
        &mut frozen,
        &loader,
        Some(&loader),
        FitOptions {
            epochs: 10,
            early_stopping: Some(EarlyStopping {
                patience: 2,
                min_delta: 0.0,
            }),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(reports.len(), 3);
    assert_eq!(
        reports.iter().map(|r| r.best).collect::<Vec<_>>(),
        vec![true, false, false]
    );
    let e = fit(
        &mut net,
        &mut frozen,
        &loader,
        None,
        FitOptions {
            early_stopping: Some(EarlyStopping {
                patience: 1,
                min_delta: 0.0,
            }),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("evaluation loader"), "{e}");
}
