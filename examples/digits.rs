//! Trains a small network on the 8x8 handwritten digits embedded in kiln, then saves its
//! checkpoint and its frozen inference model.
//!
//! ```text
//! cargo run --release --example digits [-- --model cnn|resnet --epochs 10 --out FILE]
//! ```
//!
//! `cnn` (the default) is conv16-conv32-pool-fc64-fc10; `resnet` is a stem and two residual
//! blocks (the second with a 1x1 stride-2 shortcut) with batch norm, global average pooling
//! and a linear head. Both train with SGD (momentum 0.9, lr 0.05), batch 32, on a seeded 80/20
//! split, and write `digits_<model>.safetensors` and `digits_<model>.frozen.safetensors`.

#[path = "common/curves.rs"]
mod curves;

use std::path::PathBuf;
use std::time::Instant;

use kiln::data::{self, DataLoader, Dataset};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Sgd, SgdOptions};
use kiln::train::{fit, FitOptions};
use kiln::Device;

/// The example network (its state-dict names match the same `torch.nn.Sequential`).
const DIGITS_CNN: &str =
    "conv2d(1,16,3,p=1) relu conv2d(16,32,3,p=1) relu maxpool2d(2) flatten linear(512,64) relu linear(64,10)";
/// The residual network (torchvision's `BasicBlock` names inside each block).
const DIGITS_RESNET: &str = "conv2d(1,16,3,p=1,bias=false) batchnorm2d(16) relu basicblock(16,16) basicblock(16,32,s=2) adaptive_avgpool2d(1,1) flatten linear(32,10)";

fn main() -> kiln::Result<()> {
    let mut epochs = 10;
    let mut name = "cnn".to_string();
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--epochs", Some(v)) => epochs = v.parse().unwrap_or(epochs),
            ("--out", Some(v)) => out = Some(PathBuf::from(v)),
            ("--model", Some(v)) if v == "cnn" || v == "resnet" => name = v,
            _ => {
                eprintln!("usage: digits [--model cnn|resnet] [--epochs N] [--out FILE]");
                std::process::exit(2);
            }
        }
    }
    let spec = if name == "cnn" {
        DIGITS_CNN
    } else {
        DIGITS_RESNET
    };
    let out = out.unwrap_or_else(|| PathBuf::from(format!("digits_{name}.safetensors")));
    let start = Instant::now();
    let dev = Device::default_device()?;
    println!("device: {dev}");
    let all = data::digits()?;
    let (train_set, test_set) = all.split(0.8, 0)?;
    println!(
        "digits: {} training and {} test images of {:?}",
        train_set.len(),
        test_set.len(),
        all.feature_shape()
    );

    let mut init = Init::new(&dev, 0);
    let mut model = Sequential::from_spec(&mut init, spec)?;
    println!("{}", model.describe());
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let train = DataLoader::new(&train_set, 32, &dev).shuffle(1);
    let test = DataLoader::new(&test_set, 256, &dev);
    let reports = fit(
        &mut model,
        &mut opt,
        &train,
        Some(&test),
        FitOptions {
            epochs,
            progress_bar: true,
            ..Default::default()
        },
    )?;
    for r in &reports {
        println!(
            "epoch {:>2}: train loss {:.4} acc {:.2}% | test loss {:.4} acc {:.2}% | {:.2} s",
            r.epoch + 1,
            r.train_loss,
            r.train_accuracy.unwrap_or(f32::NAN) * 100.0,
            r.eval_loss.unwrap_or(f32::NAN),
            r.eval_accuracy.unwrap_or(f32::NAN) * 100.0,
            r.seconds
        );
    }
    kiln::checkpoint::save(&out, &model, None, Some(spec))?;
    let curves_path = out.with_extension("curves.svg");
    match curves::save_curves(&curves_path, &format!("digits, {name}"), &reports) {
        Ok(()) => println!("wrote {}", curves_path.display()),
        Err(e) => eprintln!("could not draw the curves: {e}"),
    }
    println!(
        "saved {} ({} parameters)",
        out.display(),
        model.parameters().iter().map(|p| p.numel()).sum::<usize>()
    );
    // Freeze for inference: batch norm folded, bias and activations fused, memory planned.
    let batches: Vec<_> = test.epoch(0).collect::<kiln::Result<_>>()?;
    let frozen = kiln::infer::freeze(model, &batches[0].inputs)?;
    drop(opt);
    // One deployable file: the graph and its weights, loadable without this code.
    let frozen_path = out.with_extension("frozen.safetensors");
    frozen.save(&frozen_path)?;
    println!("saved the frozen model to {}", frozen_path.display());
    frozen.classify(&batches[0].inputs)?;
    let t = Instant::now();
    let mut correct = 0;
    for b in &batches {
        let p = frozen.classify(&b.inputs)?;
        correct += p.iter().zip(&b.labels).filter(|(p, l)| p == l).count();
    }
    println!(
        "frozen inference: accuracy {:.2}%, {:.2} ms per batch of 256",
        100.0 * correct as f64 / test_set.len() as f64,
        t.elapsed().as_secs_f64() * 1e3 / batches.len() as f64
    );
    let s = dev.stats();
    println!(
        "total {:.1} s; {} dispatches, {} submits, {} readbacks; peak GPU memory {:.1} MiB",
        start.elapsed().as_secs_f64(),
        s.dispatches,
        s.submits,
        s.readbacks,
        s.peak_bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
