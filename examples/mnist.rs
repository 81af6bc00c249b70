//! Trains a LeNet-style CNN on MNIST (conv32-pool-conv64-pool-fc128-fc10) with SGD
//! (momentum 0.9, lr 0.05, divided by 5 each epoch), batch 64.
//!
//! ```text
//! scripts/fetch_mnist data/mnist
//! cargo run --release --example mnist -- data/mnist [--epochs 2] [--batch 64]
//! ```

#[path = "common/curves.rs"]
mod curves;

use std::path::PathBuf;
use std::time::Instant;

use kiln::data::{self, DataLoader, Dataset};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Sgd, SgdOptions, StepDecay};
use kiln::train::{fit, FitOptions};
use kiln::Device;

const MNIST_CNN: &str =
    "conv2d(1,32,3,p=1) relu maxpool2d(2) conv2d(32,64,3,p=1) relu maxpool2d(2) \
                         flatten linear(3136,128) relu linear(128,10)";

fn main() -> kiln::Result<()> {
    let mut dir = None;
    let (mut epochs, mut batch) = (2usize, 64usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--epochs" => epochs = args.next().and_then(|v| v.parse().ok()).unwrap_or(epochs),
            "--batch" => batch = args.next().and_then(|v| v.parse().ok()).unwrap_or(batch),
            other => dir = Some(PathBuf::from(other)),
        }
    }
    let Some(dir) = dir else {
        eprintln!("usage: mnist DATA_DIR [--epochs N] [--batch N]   (scripts/fetch_mnist DATA_DIR downloads it)");
        std::process::exit(2);
    };
    let dev = Device::default_device()?;
    println!("device: {dev}");
    let (train_set, test_set) = data::mnist(&dir)?;
    println!(
        "MNIST: {} training and {} test images of {:?}",
        train_set.len(),
        test_set.len(),
        train_set.feature_shape()
    );
    let mut model = Sequential::from_spec(&mut Init::new(&dev, 0), MNIST_CNN)?;
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let train = DataLoader::new(&train_set, batch, &dev).shuffle(1);
    let test = DataLoader::new(&test_set, 1000, &dev);
    let start = Instant::now();
    let schedule = StepDecay {
        base_lr: 0.05,
        step_size: 1,
        gamma: 0.2,
    };
    let options = FitOptions {
        epochs,
        schedule: Some(&schedule),
        progress_bar: true,
        ..Default::default()
    };
    let reports = fit(&mut model, &mut opt, &train, Some(&test), options)?;
    for r in &reports {
        println!(
            "epoch {}: train loss {:.4} acc {:.2}% | test acc {:.2}% | {:.1} s",
            r.epoch + 1,
            r.train_loss,
            r.train_accuracy.unwrap_or(f32::NAN) * 100.0,
            r.eval_accuracy.unwrap_or(f32::NAN) * 100.0,
            r.seconds
        );
    }
    kiln::checkpoint::save(
        &dir.join("mnist_cnn.safetensors"),
        &model,
        None,
        Some(MNIST_CNN),
    )?;
    let curves_path = dir.join("mnist_cnn.curves.svg");
    match curves::save_curves(&curves_path, "MNIST, LeNet-style CNN", &reports) {
        Ok(()) => println!("wrote {}", curves_path.display()),
        Err(e) => eprintln!("could not draw the curves: {e}"),
    }
    println!("total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
