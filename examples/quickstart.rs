//! A tour of kiln's tensor operations: prints the device, a few results and timings.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::time::Instant;

use kiln::{Device, Tensor};

fn main() -> kiln::Result<()> {
    let t0 = Instant::now();
    let dev = Device::default_device()?;
    println!(
        "device: {dev} (created in {:.1} ms)",
        t0.elapsed().as_secs_f64() * 1e3
    );

    let a = Tensor::from_slice(&[1.0, -2.0, 3.0, -4.0, 5.0, -6.0], &[2, 3], &dev)?;
    println!("a = {a}");
    println!("relu(a) = {}", a.relu()?);
    println!("softmax(a, -1) = {}", a.softmax(-1)?);
    println!("a.sum(axis 0) = {}", a.sum(&[0], false)?);
    println!("argmax(a, -1) = {}", a.argmax(-1, false)?);
    println!("a @ a^T = {}", a.matmul(&a.t()?)?);

    // A small MLP forward pass: everything is recorded, then submitted at the first readback.
    let x = Tensor::randn(&[64, 256], 0, &dev)?;
    let w1 = Tensor::randn(&[128, 256], 1, &dev)?.mul_scalar(1.0 / 16.0)?;
    let w2 = Tensor::randn(&[10, 128], 2, &dev)?.mul_scalar(1.0 / 11.3)?;
    dev.synchronize()?;
    let before = dev.stats();
    let t1 = Instant::now();
    let h = x.matmul(&w1.t()?)?.gelu()?;
    let probs = h.matmul(&w2.t()?)?.softmax(-1)?;
    let row_sums = probs.sum(&[-1], false)?.to_vec()?;
    let after = dev.stats();
    println!(
        "MLP 64x256 -> 128 -> 10: {:.2} ms, {} dispatches, {} submit(s); softmax rows sum to {:.6}",
        t1.elapsed().as_secs_f64() * 1e3,
        after.dispatches - before.dispatches,
        after.submits - before.submits,
        row_sums.iter().sum::<f32>() / row_sums.len() as f32
    );

    // Matmul throughput.
    for n in [128usize, 256] {
        let p = Tensor::randn(&[n, n], 3, &dev)?;
        let q = Tensor::randn(&[n, n], 4, &dev)?;
        p.matmul(&q)?.sum_all()?.to_scalar()?; // warm-up (pipeline compilation)
        let reps = 5;
        let t = Instant::now();
        let mut last = None;
        for _ in 0..reps {
            last = Some(p.matmul(&q)?);
        }
        if let Some(r) = last {
            r.sum_all()?.to_scalar()?;
        }
        let secs = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "matmul {n}^3: {:.2} ms, {:.2} GFLOP/s",
            secs * 1e3,
            2.0 * (n as f64).powi(3) / secs / 1e9
        );
    }
    let s = dev.stats();
    println!(
        "totals: {} dispatches, {} submits, {} readbacks; live {} KiB, peak {} KiB",
        s.dispatches,
        s.submits,
        s.readbacks,
        s.live_bytes / 1024,
        s.peak_bytes / 1024
    );
    Ok(())
}
