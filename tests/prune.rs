//! Pruning: unstructured L1 masks (per tensor and global) against a CPU selection of the
//! smallest magnitudes, masks that hold through fine-tuning, `remove`; structured channel
//! pruning that removes dead filters exactly and fine-tunes back; bad amounts.

mod common;

use common::*;
use kiln::data::{self, DataLoader, Dataset};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Adam, AdamOptions, Optimizer};
use kiln::prune::{global_l1_unstructured, l1_unstructured, weights};
use kiln::Tensor;

/// The indices of the `k` smallest |v| (ties by position).
fn smallest(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].abs().partial_cmp(&v[b].abs()).unwrap().then(a.cmp(&b)));
    let mut out = idx[..k].to_vec();
    out.sort();
    out
}

fn zeros(v: &[f32]) -> Vec<usize> {
    (0..v.len()).filter(|&i| v[i] == 0.0).collect()
}

#[test]
fn masks_prune_the_smallest_magnitudes() {
    let d = dev();
    let net = Sequential::from_spec(&mut Init::new(&d, 4), "linear(7,9) relu linear(9,5)").unwrap();
    let params = weights(&net);
    assert_eq!(params.len(), 2, "two weights, no biases");
    let before: Vec<Vec<f32>> = params.iter().map(|(_, t)| t.to_vec().unwrap()).collect();
    // Per tensor: round(0.3 * 63) = 19 and round(0.3 * 45) = 14.
    let p = l1_unstructured(&params, 0.3).unwrap();
    for ((_, t), b) in params.iter().zip(&before) {
        let k = (0.3 * b.len() as f64).round() as usize;
        assert_eq!(zeros(&t.to_vec().unwrap()), smallest(b, k));
    }
    assert!((p.sparsity().unwrap() - 33.0 / 108.0).abs() < 1e-6);
    // Global: the 54 smallest of all 108, wherever they are.
    for ((_, t), b) in params.iter().zip(&before) {
        t.assign(&Tensor::from_slice(b, t.dims(), &d).unwrap())
            .unwrap();
    }
    let g = global_l1_unstructured(&params, 0.5).unwrap();
    let all: Vec<f32> = before.iter().flatten().copied().collect();
    let want = smallest(&all, 54);
    let got: Vec<f32> = params
        .iter()
        .flat_map(|(_, t)| t.to_vec().unwrap())
        .collect();
    assert_eq!(zeros(&got), want);
    assert_eq!(g.masks().len(), 2);
    // The untouched entries keep their values exactly.
    for (i, (&x, &y)) in got.iter().zip(&all).enumerate() {
        assert!(x == 0.0 || x == y, "{i}: {x} vs {y}");
    }
}

#[test]
fn pruned_weights_stay_zero_through_fine_tuning() {
    let d = dev();
    let spec = "conv2d(1,8,3,p=1) relu maxpool2d(2) flatten linear(128,32) relu linear(32,10)";
    let mut model = Sequential::from_spec(&mut Init::new(&d, 2), spec).unwrap();
    let mut opt = Adam::new(
        model.parameters(),
        AdamOptions {
            lr: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let (train, test) = data::digits().unwrap().split(0.8, 0).unwrap();
    let loader = DataLoader::new(&train, 64, &d).shuffle(3);
    let step = |model: &Sequential, opt: &mut Adam, b: &kiln::data::Batch| {
        let loss = kiln::loss::cross_entropy(
            &model.forward(&b.inputs).unwrap(),
            &b.targets,
            &Default::default(),
        )
        .unwrap();
        opt.zero_grad();
        loss.backward().unwrap();
        opt.step().unwrap();
    };
    for b in loader.epoch(0) {
        step(&model, &mut opt, &b.unwrap());
    }
    let pruning = global_l1_unstructured(&weights(&model), 0.5).unwrap();
    let masks = pruning.masks();
    for b in loader.epoch(1) {
        step(&model, &mut opt, &b.unwrap());
        pruning.apply().unwrap();
    }
    pruning.remove().unwrap();
    model.set_training(false);
    for ((name, t), (_, m)) in weights(&model).iter().zip(&masks) {
        let (v, m) = (t.to_vec().unwrap(), m.to_vec().unwrap());
        assert!(
            v.iter().zip(&m).all(|(x, k)| *k == 1.0 || *x == 0.0),
            "{name}"
        );
    }
    let mut right = 0;
    for b in DataLoader::new(&test, 64, &d).epoch(0) {
        let b = b.unwrap();
        let p = kiln::no_grad(|| model.forward(&b.inputs))
            .unwrap()
            .argmax(-1, false)
            .unwrap()
            .to_vec()
            .unwrap();
        right += p
            .iter()
            .zip(&b.labels)
            .filter(|(p, l)| **p as usize == **l)
            .count();
    }
    let acc = right as f64 / test.len() as f64;
    assert!(acc > 0.85, "half the weights pruned and fine-tuned: {acc}");
}

#[test]
fn bad_amounts_are_errors() {
    let d = dev();
    let net = Sequential::from_spec(&mut Init::new(&d, 0), "linear(3,2)").unwrap();
    let params = weights(&net);
    for a in [-0.1, 1.0, 1.5, f32::NAN] {
        assert!(l1_unstructured(&params, a).is_err(), "{a}");
        assert!(global_l1_unstructured(&params, a).is_err(), "{a}");
    }
    assert!(l1_unstructured(&[], 0.5).is_err());
    let p = l1_unstructured(&params, 0.0).unwrap();
    assert_eq!(p.sparsity().unwrap(), 0.0);
}

/// Structured pruning removes channels: when the pruned filters are dead (zero weights and
/// bias), the smaller network computes the same function.
#[test]
fn channel_pruning_removes_dead_filters_exactly() {
    let d = dev();
    let spec = "conv2d(1,8,3,p=1) relu flatten linear(512,10)";
    let net = Sequential::from_spec(&mut Init::new(&d, 6), spec).unwrap();
    let sd = net.state_dict();
    let (w, b) = (&sd[0].1, &sd[1].1);
    let mut wv = w.to_vec().unwrap();
    let mut bv = b.to_vec().unwrap();
    for c in [1usize, 2, 5, 6] {
        wv[c * 9..(c + 1) * 9].iter_mut().for_each(|v| *v = 0.0);
        bv[c] = 0.0;
    }
    w.assign(&Tensor::from_slice(&wv, w.dims(), &d).unwrap())
        .unwrap();
    b.assign(&Tensor::from_slice(&bv, b.dims(), &d).unwrap())
        .unwrap();
    let (small, small_spec) =
        kiln::prune::channels(&net, spec, 0.5, &mut Init::new(&d, 0)).unwrap();
    assert_eq!(
        small_spec,
        "conv2d(1,4,3,s=1,p=1,d=1,g=1,bias=true) relu flatten linear(256,10,bias=true)"
    );
    let x = Tensor::randn(&[3, 1, 8, 8], 4, &d).unwrap();
    let (a, s) = (
        kiln::no_grad(|| net.forward(&x)).unwrap().to_vec().unwrap(),
        kiln::no_grad(|| small.forward(&x))
            .unwrap()
            .to_vec()
            .unwrap(),
    );
    for (p, q) in a.iter().zip(&s) {
        assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{p} vs {q}");
    }
    // Residual blocks: the channels between their convolutions go by conv1's norms; the
    // channels a skip connection adds go on both branches alike (the stem and block 1's
    // conv2 together, then block 2's conv2 and its projection). With those filters dead,
    // the smaller network computes the same function.
    let res = "conv2d(1,8,3,p=1) basicblock(8,8) basicblock(8,16,s=2) flatten linear(256,10)";
    let mut net = Sequential::from_spec(&mut Init::new(&d, 1), res).unwrap();
    net.set_training(false);
    let sd: std::collections::HashMap<String, Tensor> = net
        .state_dict()
        .into_iter()
        .map(|(n, t, _)| (n, t))
        .collect();
    let kill = |name: &str, per: usize, channels: &[usize]| {
        let t = &sd[name];
        let mut v = t.to_vec().unwrap();
        for &c in channels {
            v[c * per..(c + 1) * per].iter_mut().for_each(|x| *x = 0.0);
        }
        t.assign(&Tensor::from_slice(&v, t.dims(), &d).unwrap())
            .unwrap();
    };
    // Dead middle channels: conv1 filters zero and bn1 mapping them to 0 (gamma 0, beta 0).
    for (b, mid) in [(1, 8), (2, 16)] {
        let half: Vec<usize> = (0..mid / 2).collect();
        kill(&format!("{b}.conv1.weight"), 72, &half); // 8 input channels, 3x3
        kill(&format!("{b}.bn1.weight"), 1, &half);
        kill(&format!("{b}.bn1.bias"), 1, &half);
    }
    // Dead residual channels: odd ones after the stem and block 1, every fourth pair after
    // block 2, on every branch that writes them.
    let odd = [1usize, 3, 5, 7];
    kill("0.weight", 9, &odd);
    kill("0.bias", 1, &odd);
    kill("1.conv2.weight", 72, &odd);
    kill("1.bn2.weight", 1, &odd);
    kill("1.bn2.bias", 1, &odd);
    let second = [0usize, 1, 4, 5, 8, 9, 12, 13];
    kill("2.conv2.weight", 144, &second);
    kill("2.downsample.0.weight", 8, &second);
    for n in [
        "2.bn2.weight",
        "2.bn2.bias",
        "2.downsample.1.weight",
        "2.downsample.1.bias",
    ] {
        kill(n, 1, &second);
    }
    let (mut small, s) = kiln::prune::channels(&net, res, 0.5, &mut Init::new(&d, 0)).unwrap();
    small.set_training(false);
    assert_eq!(
        s,
        "conv2d(1,4,3,s=1,p=1,d=1,g=1,bias=true) basicblock(4,4,s=1,mid=4) \
         basicblock(4,8,s=2,mid=8) flatten linear(128,10,bias=true)"
    );
    assert!(small.parameter_count() * 2 < net.parameter_count());
    let x = Tensor::randn(&[2, 1, 8, 8], 3, &d).unwrap();
    let (a, b) = (
        kiln::no_grad(|| net.forward(&x)).unwrap().to_vec().unwrap(),
        kiln::no_grad(|| small.forward(&x))
            .unwrap()
            .to_vec()
            .unwrap(),
    );
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{p} vs {q}");
    }
    // An identity block that gives the model's output keeps its channels, and so does the
    // layer before it.
    let tail = "conv2d(1,8,3,p=1) relu basicblock(8,8)";
    let net = Sequential::from_spec(&mut Init::new(&d, 1), tail).unwrap();
    let (_, s) = kiln::prune::channels(&net, tail, 0.5, &mut Init::new(&d, 0)).unwrap();
    assert!(s.ends_with("basicblock(8,8,s=1,mid=4)"), "{s}");
    // So does a projection block with no layer after it that reads its channels.
    for tail in [
        "conv2d(3,16,3,p=1) relu basicblock(16,32,s=2) adaptive_avgpool2d(1,1)",
        "conv2d(3,16,3,p=1) relu basicblock(16,32,s=2) adaptive_avgpool2d(1,1) flatten",
    ] {
        let net = Sequential::from_spec(&mut Init::new(&d, 1), tail).unwrap();
        let (small, s) = kiln::prune::channels(&net, tail, 0.5, &mut Init::new(&d, 0)).unwrap();
        assert!(s.contains("basicblock(16,32,s=2,mid=16)"), "{s}");
        let x = Tensor::randn(&[1, 3, 8, 8], 5, &d).unwrap();
        let y = kiln::no_grad(|| small.forward(&x)).unwrap();
        assert_eq!(y.numel(), 32, "{s}");
    }
    // A spec that does not describe the model is an Err, not a guess or a panic.
    for other in [
        "conv2d(1,8,3,p=1) basicblock(8,16) basicblock(16,16,s=2) flatten linear(256,10)",
        "conv2d(1,8,3,p=1) basicblock(8,8) basicblock(8,16,s=2) flatten linear(128,10)",
    ] {
        let e = kiln::prune::channels(&net, other, 0.5, &mut Init::new(&d, 0)).err();
        assert!(e.is_some_and(|e| e.to_string().contains("spec")), "{other}");
    }
    // Bad amounts are an Err.
    assert!(kiln::prune::channels(&net, res, 1.0, &mut Init::new(&d, 0)).is_err());
    assert!(kiln::prune::channels(&net, "linear(3,2)", 0.5, &mut Init::new(&d, 0)).is_err());
    // Channels on the last axis (after a linear layer) do not flatten channel-major, and a
    // convolution after a linear layer does not read them: both refused, not guessed.
    for spec in [
        "linear(8,16) relu flatten linear(64,10)",
        "linear(8,16) relu conv2d(16,4,3)",
        "conv2d(1,8,3,p=1) relu linear(8,10)",
    ] {
        let net = Sequential::from_spec(&mut Init::new(&d, 1), spec).unwrap();
        let e = kiln::prune::channels(&net, spec, 0.5, &mut Init::new(&d, 0)).err();
        assert!(
            e.is_some_and(|e| e.to_string().contains("cannot prune")),
            "{spec}"
        );
    }
    // A linear stack prunes along its features, batchnorm1d included.
    let spec = "linear(6,8) batchnorm1d(8) relu linear(8,3)";
    let net = Sequential::from_spec(&mut Init::new(&d, 1), spec).unwrap();
    let (_, s) = kiln::prune::channels(&net, spec, 0.5, &mut Init::new(&d, 0)).unwrap();
    assert!(s.starts_with("linear(6,4,bias=true) batchnorm1d(4,"), "{s}");
}

/// 50% of the channels of the digits CNN removed, then one epoch of fine-tuning: accuracy
/// within 1 point of the unpruned model, and a frozen file at most 0.6 of its size.
#[test]
fn pruned_digits_cnn_fine_tunes_back() {
    let d = dev();
    let spec = "conv2d(1,16,3,p=1) batchnorm2d(16) relu conv2d(16,32,3,p=1) relu maxpool2d(2) \
                flatten linear(512,64) relu linear(64,10)";
    let accuracy = |m: &kiln::infer::InferenceModel| digits_accuracy(m, &d).0;
    let mut model = Sequential::from_spec(&mut Init::new(&d, 1), spec).unwrap();
    train_digits(&mut model, 0..3, 0.01, 64, 5, &d);
    let (mut small, small_spec) =
        kiln::prune::channels(&model, spec, 0.5, &mut Init::new(&d, 0)).unwrap();
    assert!(small_spec.starts_with("conv2d(1,8,"), "{small_spec}");
    // Fine-tuning at a tenth of the training rate, in batches of 16.
    train_digits(&mut small, 3..4, 0.001, 16, 5, &d);
    let x = Tensor::zeros(&[2, 1, 8, 8], &d).unwrap();
    let (full, pruned) = (
        kiln::infer::freeze(model, &x).unwrap(),
        kiln::infer::freeze(small, &x).unwrap(),
    );
    let (a, b) = (accuracy(&full), accuracy(&pruned));
    println!("digits CNN: {a:.2}%, pruned 50% and fine-tuned {b:.2}%");
    assert!((a - b).abs() <= 1.0, "{a} vs {b}");
    let (fb, pb) = (
        full.to_bytes().unwrap().len(),
        pruned.to_bytes().unwrap().len(),
    );
    assert!(pb as f64 <= 0.6 * fb as f64, "{pb} of {fb} bytes");
}
