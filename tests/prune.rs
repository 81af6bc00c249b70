//! Unstructured L1 pruning: per-tensor and global masks against a CPU selection of the
//! smallest magnitudes, masks that hold through fine-tuning, `remove`, and bad amounts.

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
