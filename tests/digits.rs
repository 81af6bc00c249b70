//! The main job end to end: the digits example's CNN reaches at least 98% test accuracy
//! within 10 epochs (the same data split, model, optimizer and seeds as the example).

mod common;

use common::*;
use kiln::data::{self, DataLoader};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Sgd, SgdOptions};
use kiln::train::{fit, FitOptions};

const DIGITS_CNN: &str =
    "conv2d(1,16,3,p=1) relu conv2d(16,32,3,p=1) relu maxpool2d(2) flatten linear(512,64) relu linear(64,10)";

#[test]
fn digits_cnn_reaches_98_percent_within_10_epochs() {
    let d = dev();
    let (train_set, test_set) = data::digits().unwrap().split(0.8, 0).unwrap();
    let mut model = Sequential::from_spec(&mut Init::new(&d, 0), DIGITS_CNN).unwrap();
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    let train = DataLoader::new(&train_set, 32, &d).shuffle(1);
    let test = DataLoader::new(&test_set, 256, &d);
    let reports = fit(
        &mut model,
        &mut opt,
        &train,
        Some(&test),
        FitOptions {
            epochs: 10,
            ..Default::default()
        },
    )
    .unwrap();
    let acc: Vec<f32> = reports.iter().map(|r| r.eval_accuracy.unwrap()).collect();
    let best = acc.iter().cloned().fold(0.0, f32::max);
    assert!(best >= 0.98, "test accuracy per epoch: {acc:?}");
    assert!(acc[9] >= 0.97, "final test accuracy {}", acc[9]);
    assert!(reports[9].train_loss < reports[0].train_loss / 10.0);
}
