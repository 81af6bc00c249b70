//! Soak run: trains a small network for many steps, then serves a frozen copy over 100
//! distinct batch sizes, printing GPU live and peak bytes, pooled bytes and the process's
//! resident memory every 1,000 steps. All should stay flat after warm-up.
//!
//! ```text
//! cargo run --release --example soak [-- STEPS]      # 10000 by default
//! ```

use kiln::infer::freeze;
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Optimizer, Sgd, SgdOptions};
use kiln::{Device, Tensor};

/// Resident set size of this process in KiB (Linux; 0 elsewhere).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn report(what: &str, step: usize, dev: &Device) {
    let s = dev.stats();
    println!(
        "{what} {step:>6}: live {:>8} B, peak {:>8} B, pooled {:>8} B, rss {:>7} KiB",
        s.live_bytes,
        s.peak_bytes,
        s.pooled_bytes,
        rss_kib()
    );
}

fn main() -> kiln::Result<()> {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let dev = Device::default_device()?;
    println!("device: {dev}");
    let model = Sequential::from_spec(&mut Init::new(&dev, 0), "linear(16,32) relu linear(32,4)")?;
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.01,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let x = Tensor::randn(&[32, 16], 1, &dev)?;
    let t = Tensor::from_slice(
        &(0..32).map(|i| (i % 4) as f32).collect::<Vec<_>>(),
        &[32],
        &dev,
    )?;
    for step in 1..=steps {
        let loss = kiln::loss::cross_entropy(&model.forward(&x)?, &t, &Default::default())?;
        opt.zero_grad();
        loss.backward()?;
        opt.step()?;
        if step % 1000 == 0 {
            dev.synchronize()?;
            report("train", step, &dev);
        }
    }
    drop(opt);
    let frozen = freeze(model, &x)?;
    for call in 1..=steps {
        let n = 1 + call % 100;
        frozen.predict(&Tensor::randn(&[n, 16], call as u64, &dev)?)?;
        if call % 1000 == 0 {
            dev.synchronize()?;
            report("serve", call, &dev);
        }
    }
    println!("plan cache: {} B", frozen.plan_cache_bytes());
    Ok(())
}
