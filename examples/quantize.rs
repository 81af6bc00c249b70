//! Trains the digits CNN and the ResNet-style net, freezes them, quantizes them to int8 and
//! prints one table: variant, accuracy on the digits test split, file size, latency per batch
//! of 64 and peak GPU memory of an inference, for f32, f16 (where the adapter has
//! `SHADER_F16`), int8 static (MinMax and 99.99th-percentile calibration on 4 batches) and
//! int8 dynamic (linear layers only, activations quantized per batch at run time), and 50% of
//! the channels pruned (`kiln::prune::channels`) then fine-tuned for one epoch.
//!
//! ```text
//! cargo run --release --example quantize
//! KILN_PROFILE=1 cargo run --release --example quantize   # and each variant's kernels
//! ```

use std::time::Instant;

use kiln::data::{self, Batch, DataLoader};
use kiln::infer::{freeze, InferenceModel, Observer, QuantizeOptions};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Adam, AdamOptions, Optimizer};
use kiln::{Device, Result, Tensor};

const CNN: &str = "conv2d(1,16,3,p=1) relu conv2d(16,32,3,p=1) relu maxpool2d(2) flatten \
                   linear(512,64) relu linear(64,10)";
const RESNET: &str = "conv2d(1,16,3,p=1,bias=false) batchnorm2d(16) relu basicblock(16,16) \
                      basicblock(16,32,s=2) adaptive_avgpool2d(1,1) flatten linear(32,10)";

fn train(spec: &str, epochs: usize, dev: &Device) -> Result<Sequential> {
    let mut model = Sequential::from_spec(&mut Init::new(dev, 1), spec)?;
    tune(&mut model, 0..epochs, 0.01, 64, dev)?;
    Ok(model)
}

/// Adam over `epochs` of the digits training split.
fn tune(
    model: &mut Sequential,
    epochs: std::ops::Range<usize>,
    lr: f32,
    batch: usize,
    dev: &Device,
) -> Result<()> {
    let mut opt = Adam::new(
        model.parameters(),
        AdamOptions {
            lr,
            ..Default::default()
        },
    )?;
    let (train, _) = data::digits()?.split(0.8, 0)?;
    let loader = DataLoader::new(&train, batch, dev).shuffle(1);
    model.set_training(true);
    for epoch in epochs {
        for batch in loader.epoch(epoch) {
            let batch = batch?;
            let loss = kiln::loss::cross_entropy(
                &model.forward(&batch.inputs)?,
                &batch.targets,
                &Default::default(),
            )?;
            opt.zero_grad();
            loss.backward()?;
            opt.step()?;
        }
    }
    model.set_training(false);
    Ok(())
}

/// Accuracy (%), milliseconds per batch of 64 (median of the runs), peak bytes.
fn measure(model: &InferenceModel, test: &[Batch], dev: &Device) -> Result<(f64, f64, u64)> {
    let (mut right, mut total) = (0, 0);
    for b in test {
        let p = model.classify(&b.inputs)?;
        right += p.iter().zip(&b.labels).filter(|(p, l)| p == l).count();
        total += p.len();
    }
    let x = &test[0].inputs;
    model.predict(x)?.to_vec()?;
    dev.reset_peak_bytes();
    let mut times = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        model.predict(x)?.to_vec()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((
        100.0 * right as f64 / total as f64,
        times[times.len() / 2],
        dev.peak_bytes(),
    ))
}

fn main() -> Result<()> {
    let dev = Device::default_device()?;
    println!("{}", dev.name());
    let (train_set, test_set) = data::digits()?.split(0.8, 0)?;
    let test: Vec<Batch> = DataLoader::new(&test_set, 64, &dev)
        .epoch(0)
        .collect::<Result<_>>()?;
    let calibration: Vec<Tensor> = DataLoader::new(&train_set, 64, &dev)
        .shuffle(9)
        .epoch(0)
        .take(4)
        .map(|b| b.map(|b| b.inputs))
        .collect::<Result<_>>()?;
    println!(
        "{:<12} {:<22} {:>9} {:>11} {:>9} {:>9} {:>11}",
        "model", "variant", "accuracy", "file", "size", "ms/batch", "peak"
    );
    for (name, spec, epochs) in [("digits CNN", CNN, 3), ("ResNet", RESNET, 3)] {
        let model = train(spec, epochs, &dev)?;
        let example = Tensor::zeros(&[2, 1, 8, 8], &dev)?;
        // Half the channels removed, then one epoch of fine-tuning (plain stacks only).
        let pruned = match kiln::prune::channels(&model, spec, 0.5, &mut Init::new(&dev, 2)) {
            Ok((mut small, _)) => {
                tune(&mut small, epochs..epochs + 1, 0.001, 16, &dev)?;
                Ok(freeze(small, &example)?)
            }
            Err(e) => Err(e),
        };
        let f32_model = freeze(model, &example)?;
        let f32_bytes = f32_model.to_bytes()?.len();
        let mut variants: Vec<(String, InferenceModel)> = Vec::new();
        for (label, observer) in [
            ("int8 static, MinMax", Observer::MinMax),
            ("int8 static, p99.99", Observer::Percentile(99.99)),
        ] {
            let q = f32_model.quantize(&QuantizeOptions {
                calibration: calibration.clone(),
                observer,
            })?;
            variants.push((label.into(), q));
        }
        variants.push(("int8 dynamic".into(), f32_model.quantize_dynamic()?));
        let bytes = f32_model.to_bytes()?;
        let half = InferenceModel::from_bytes(&bytes, &dev)?.to_half();
        variants.insert(0, ("f32".into(), f32_model));
        let half_note = match half {
            Ok(h) => {
                variants.insert(1, ("f16".into(), h));
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let prune_note = match pruned {
            Ok(p) => {
                variants.push(("pruned 50% + 1 epoch".into(), p));
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let mut base_ms = None;
        for (label, m) in &variants {
            let (acc, ms, peak) = measure(m, &test, &dev)?;
            let size = m.to_bytes()?.len();
            let base = *base_ms.get_or_insert(ms);
            println!(
                "{name:<12} {label:<22} {acc:>8.2}% {:>8.1} KiB {:>8.2}x {ms:>9.2} {:>7.1} KiB   ({:.2}x f32 speed)",
                size as f64 / 1024.0,
                size as f64 / f32_bytes as f64,
                peak as f64 / 1024.0,
                base / ms
            );
        }
        if std::env::var_os("KILN_PROFILE").is_some() {
            // Where an inference's time goes, dispatch by dispatch.
            for (label, m) in &variants {
                dev.set_profiling(true);
                m.predict(&test[0].inputs)?.to_vec()?;
                let rows = dev.profile();
                dev.set_profiling(false);
                let total: f64 = rows.iter().map(|r| r.seconds).sum();
                println!(
                    "  {name} {label}: {:.2} ms dispatch by dispatch",
                    total * 1e3
                );
                for r in rows.iter().take(6) {
                    println!(
                        "    {:>8.2} ms {:>3} x {}",
                        r.seconds * 1e3,
                        r.calls,
                        r.kernel
                    );
                }
            }
        }
        if let Some(e) = half_note {
            println!("{name:<12} f16: {e}");
        }
        if let Some(e) = prune_note {
            println!("{name:<12} structured pruning: {e}");
        }
    }
    Ok(())
}
