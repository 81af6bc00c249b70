//! Loads the frozen models the digits example wrote (no training code involved) and
//! classifies the held-out digits: accuracy, latency per batch and GPU memory for each.
//!
//! ```text
//! cargo run --release --example digits                   # writes digits_cnn.frozen.safetensors
//! cargo run --release --example digits -- --model resnet # writes digits_resnet.frozen.safetensors
//! cargo run --release --example infer [-- FILE...]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln::data::{self, Batch, DataLoader, Dataset};
use kiln::infer::InferenceModel;
use kiln::Device;

fn report(path: &Path, batches: &[Batch], images: usize, dev: &Device) -> kiln::Result<()> {
    let t0 = Instant::now();
    // The file holds the captured graph and its weights.
    let model = InferenceModel::load(path, dev)?;
    println!(
        "{}: loaded in {:.1} ms, {} nodes after folding and fusion, {:.1} KiB of weights",
        path.display(),
        t0.elapsed().as_secs_f64() * 1e3,
        model.node_count(),
        model.weight_bytes() as f64 / 1024.0
    );
    // Warm-up: pipelines are compiled and activation memory planned on first use.
    model.classify(&batches[0].inputs)?;
    let mut correct = 0;
    let start = Instant::now();
    for b in batches {
        let predicted = model.classify(&b.inputs)?;
        correct += predicted
            .iter()
            .zip(&b.labels)
            .filter(|(p, l)| p == l)
            .count();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "  test accuracy {:.2}% on {images} images; {:.3} ms per batch of {} (prediction and readback)",
        100.0 * correct as f64 / images as f64,
        secs * 1e3 / batches.len() as f64,
        batches[0].inputs.dims()[0]
    );
    let plan = model.memory_plan(&[batches[0].inputs.dims()])?;
    println!(
        "  GPU memory: {:.1} KiB weights, {:.1} KiB planned activations (all activations: {:.1} KiB)",
        model.weight_bytes() as f64 / 1024.0,
        plan.planned_bytes as f64 / 1024.0,
        plan.activation_bytes as f64 / 1024.0
    );
    Ok(())
}

fn main() -> kiln::Result<()> {
    let mut paths: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let explicit = !paths.is_empty();
    if !explicit {
        paths = [
            "digits_cnn.frozen.safetensors",
            "digits_resnet.frozen.safetensors",
        ]
        .map(PathBuf::from)
        .to_vec();
    }
    let dev = Device::default_device()?;
    println!("device: {dev}");
    // The same seeded split as the training example: these images were never trained on.
    let (_, test_set) = data::digits()?.split(0.8, 0)?;
    let loader = DataLoader::new(&test_set, 64, &dev);
    let batches: Vec<_> = loader.epoch(0).collect::<kiln::Result<_>>()?;
    for path in &paths {
        if !explicit && !path.exists() {
            println!(
                "{}: not found (run the digits example first)",
                path.display()
            );
            continue;
        }
        report(path, &batches, test_set.len(), &dev)?;
    }
    Ok(())
}
