//! Loads the frozen model the digits example wrote (no training code involved) and classifies
//! the held-out digits: accuracy, latency per batch and GPU memory.
//!
//! ```text
//! cargo run --release --example digits            # writes digits_cnn.frozen.safetensors
//! cargo run --release --example infer [-- FILE]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use kiln::data::{self, DataLoader, Dataset};
use kiln::infer::InferenceModel;
use kiln::Device;

fn main() -> kiln::Result<()> {
    let path = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "digits_cnn.frozen.safetensors".into()),
    );
    let dev = Device::default_device()?;
    println!("device: {dev}");
    let t0 = Instant::now();
    // The file holds the captured graph and its weights.
    let model = InferenceModel::load(&path, &dev)?;
    println!(
        "loaded {} in {:.1} ms: {} nodes after folding and fusion, {:.1} KiB of weights",
        path.display(),
        t0.elapsed().as_secs_f64() * 1e3,
        model.node_count(),
        model.weight_bytes() as f64 / 1024.0
    );
    // The same seeded split as the training example: these images were never trained on.
    let (_, test_set) = data::digits()?.split(0.8, 0)?;
    let batch = 64;
    let loader = DataLoader::new(&test_set, batch, &dev);
    let batches: Vec<_> = loader.epoch(0).collect::<kiln::Result<_>>()?;
    // Warm-up: pipelines are compiled and activation memory planned on first use.
    model.classify(&batches[0].inputs)?;
    let mut correct = 0;
    let start = Instant::now();
    for b in &batches {
        let predicted = model.classify(&b.inputs)?;
        correct += predicted
            .iter()
            .zip(&b.labels)
            .filter(|(p, l)| p == l)
            .count();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "test accuracy {:.2}% on {} images; {:.3} ms per batch of {batch} (prediction and readback)",
        100.0 * correct as f64 / test_set.len() as f64,
        test_set.len(),
        secs * 1e3 / batches.len() as f64
    );
    println!(
        "GPU memory in use: {:.1} KiB ({:.1} KiB weights, {:.1} KiB planned activations)",
        dev.live_bytes() as f64 / 1024.0,
        model.weight_bytes() as f64 / 1024.0,
        model.memory_plan(&[batches[0].inputs.dims()])?.planned_bytes as f64 / 1024.0
    );
    Ok(())
}
