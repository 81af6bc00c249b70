//! The bench table: kernel, shape, time, throughput, and the ratio to PyTorch when its timings
//! for the same workloads are given (scripts/bench_torch.py writes them).
//!
//! ```text
//! cargo run --release --example bench                       # sizes reduced on a software GPU
//! python3 scripts/bench_torch.py > torch.txt && KILN_TORCH=torch.txt cargo run --release --example bench
//! KILN_BENCH_FULL=1 ...                                     # full sizes on any adapter
//! KILN_PROFILE=1 ...                                        # and each training step's kernels
//! KILN_COOPERATIVE_MATRIX=1 ...                             # f16 matmuls on tensor cores, where offered
//! cargo run --release --example bench -- --peer-shapes     # the peer benchmark's workloads
//! ```
//!
//! `--peer-shapes` runs the workloads of the burn peer benchmark (`all-small`: matmul 128 and
//! 256, conv2d 8x16x16x16 k3 forward and forward + backward, an MLP training step at batch 32,
//! and the CNN's training step, eval forward and frozen inference at batch 16) with its timing:
//! the median of 10 calls after 3 warm-up calls, each ended by a synchronise. With
//! `KILN_PROFILE=1` it also prints the CNN step's per-kernel profile.
//!
//! Each workload is recorded and run to completion (a synchronise) after warm-up; the table
//! shows the median of the repetitions.

use std::collections::HashMap;
use std::time::Instant;

use kiln::data::Dataset;
use kiln::infer::freeze;
use kiln::kernels::{Kernel, ShaderFile};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Optimizer, Sgd, SgdOptions};
use kiln::{Conv2dOptions, Device, Result, Tensor};

const MLP: &str = "linear(784,512) relu linear(512,512) relu linear(512,10)";
const CNN: &str = "conv2d(1,32,3,p=1) relu maxpool2d(2) conv2d(32,64,3,p=1) relu maxpool2d(2) flatten linear(3136,128) relu linear(128,10)";
/// A small ResNet: a stem, two basic blocks (the second with a 1x1 stride-2 shortcut), global
/// average pooling and a linear head, with batch norm throughout.
const RESNET: &str = "conv2d(3,16,3,p=1,bias=false) batchnorm2d(16) relu basicblock(16,16) basicblock(16,32,s=2) adaptive_avgpool2d(1,1) flatten linear(32,10)";

struct Table {
    torch: HashMap<String, f64>,
    rows: Vec<String>,
}

impl Table {
    fn row(&mut self, name: &str, shape: &str, ms: f64, work: Option<(f64, &str)>) {
        let rate = match work {
            Some((amount, unit)) => format!("{:>10.1} {unit}", amount / (ms / 1e3) / 1e9),
            None => String::new(),
        };
        let ratio = match self.torch.get(name) {
            Some(t) => format!("{:>7.2}x", t / ms),
            None => "      -".to_string(),
        };
        let line = format!("{name:<32} {shape:<28} {ms:>10.3} ms {rate:<16} {ratio}");
        println!("{line}");
        self.rows.push(line);
    }
}

/// Median milliseconds of `f` run to completion, after `warm` unmeasured runs.
fn time(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
        dev.synchronize()?;
    }
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn step(model: &Sequential, opt: &mut Sgd, x: &Tensor, t: &Tensor) -> Result<()> {
    let loss = kiln::loss::cross_entropy(&model.forward(x)?, t, &Default::default())?;
    opt.zero_grad();
    loss.backward()?;
    opt.step()
}

/// Median milliseconds of 10 calls of `f` after 3 warm-up calls, each call ended by a
/// synchronise (the peer benchmark's timing).
fn peer_time(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
        dev.synchronize()?;
    }
    let mut v = Vec::with_capacity(10);
    for _ in 0..10 {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok((v[4] + v[5]) / 2.0)
}

/// A network from `spec` with SGD (lr 0.01, momentum 0.9), a random batch of `batch` inputs
/// of shape `input`, and labels `i % 10`.
fn network(
    dev: &Device,
    spec: &str,
    input: &[usize],
    batch: usize,
) -> Result<(Sequential, Sgd, Tensor, Tensor)> {
    let model = Sequential::from_spec(&mut Init::new(dev, 0), spec)?;
    let opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.01,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let mut shape = vec![batch];
    shape.extend(input);
    let x = Tensor::randn(&shape, 9, dev)?;
    let labels: Vec<f32> = (0..batch).map(|i| (i % 10) as f32).collect();
    let t = Tensor::from_slice(&labels, &[batch], dev)?;
    Ok((model, opt, x, t))
}

/// Runs `f` with each dispatch timed alone and prints the `rows` costliest kernels.
fn print_profile(
    dev: &Device,
    what: &str,
    rows: usize,
    f: impl FnOnce() -> Result<()>,
) -> Result<()> {
    dev.set_profiling(true);
    f()?;
    dev.synchronize()?;
    let profile = dev.profile();
    dev.set_profiling(false);
    let total: f64 = profile.iter().map(|r| r.seconds).sum();
    println!(
        "profile of {what} ({:.1} ms dispatch by dispatch):",
        total * 1e3
    );
    for r in profile.iter().take(rows) {
        println!(
            "  {:>5.1}% {:>8.2} ms {:>4} x {}",
            100.0 * r.seconds / total,
            r.seconds * 1e3,
            r.calls,
            r.kernel
        );
    }
    Ok(())
}

/// The peer benchmark's `all-small` workloads, one line each: `workload ms`.
fn peer_shapes(dev: &Device) -> Result<()> {
    let profile = std::env::var_os("KILN_PROFILE").is_some();
    println!("device: {dev}");
    let line = |name: &str, ms: f64| println!("{name:<24} {ms:>10.3} ms");
    for n in [128usize, 256] {
        let a = Tensor::randn(&[n, n], 1, dev)?;
        let b = Tensor::randn(&[n, n], 2, dev)?;
        line(
            &format!("matmul {n}"),
            peer_time(dev, || a.matmul(&b).map(drop))?,
        );
    }
    let (b, c, h, k) = (8, 16, 16, 3);
    let x = Tensor::randn(&[b, c, h, h], 3, dev)?;
    let w = Tensor::randn(&[c, c, k, k], 4, dev)?;
    let pad = Conv2dOptions {
        padding: [k / 2; 2],
        ..Default::default()
    };
    line(
        "conv2d-fwd 8 16 16 3",
        peer_time(dev, || x.conv2d(&w, None, &pad).map(drop))?,
    );
    let xg = x.detach().requires_grad();
    let wg = w.detach().requires_grad();
    line(
        "conv2d-fwdbwd 8 16 16 3",
        peer_time(dev, || {
            xg.zero_grad();
            wg.zero_grad();
            xg.conv2d(&wg, None, &pad)?.sum_all()?.backward()
        })?,
    );
    for (name, spec, input, batch) in [
        ("mlp", MLP, vec![784usize], 32usize),
        ("cnn", CNN, vec![1, 28, 28], 16),
    ] {
        let (mut model, mut opt, x, t) = network(dev, spec, &input, batch)?;
        line(
            &format!("{name}-train {batch}"),
            peer_time(dev, || step(&model, &mut opt, &x, &t))?,
        );
        if name == "mlp" {
            continue;
        }
        if profile {
            print_profile(
                dev,
                &format!("a {name} training step, batch {batch}"),
                usize::MAX,
                || step(&model, &mut opt, &x, &t),
            )?;
        }
        model.set_training(false);
        line(
            &format!("{name}-eval {batch}"),
            peer_time(dev, || kiln::no_grad(|| model.forward(&x)).map(drop))?,
        );
        drop(opt);
        let frozen = freeze(model, &x)?;
        line(
            &format!("{name}-infer {batch}"),
            peer_time(dev, || frozen.predict(&x).map(drop))?,
        );
        if profile {
            print_profile(
                dev,
                &format!("frozen {name} inference, batch {batch}"),
                usize::MAX,
                || frozen.predict(&x).map(drop),
            )?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::default_device()?;
    if std::env::args().any(|a| a == "--peer-shapes") {
        return peer_shapes(&dev);
    }
    let software = dev.adapter_info().device_type == kiln::wgpu::DeviceType::Cpu
        && std::env::var_os("KILN_BENCH_FULL").is_none();
    let subgroups = dev.subgroups_of_at_least(8);
    let torch = std::env::var("KILN_TORCH")
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|text| {
            text.lines()
                .filter_map(|l| {
                    let (name, ms) = l.rsplit_once(' ')?;
                    Some((name.trim().to_string(), ms.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut table = Table {
        torch,
        rows: Vec::new(),
    };
    println!(
        "device: {dev}{}",
        if software { " (reduced sizes)" } else { "" }
    );
    println!(
        "{:<32} {:<28} {:>13} {:<16} torch/kiln",
        "workload", "shape", "time", "throughput"
    );
    let reps = if software { 3 } else { 20 };

    // Matmul: the tuned choice, and each kernel on its own.
    let sizes: &[usize] = if software {
        &[128, 256]
    } else {
        &[256, 1024, 4096]
    };
    for &n in sizes {
        let a = Tensor::randn(&[n, n], 1, &dev)?;
        let b = Tensor::randn(&[n, n], 2, &dev)?;
        let flop = 2.0 * (n as f64).powi(3);
        let ms = time(&dev, reps, || a.matmul(&b).map(drop))?;
        table.row(
            &format!("matmul {n}"),
            &format!("{n}x{n}x{n}"),
            ms,
            Some((flop, "GFLOP/s")),
        );
        for (k, label) in [
            (Kernel::MatmulFwd, "register 4x4"),
            (Kernel::MatmulTiledFwd, "shared-memory 64x64"),
            (Kernel::MatmulTiled128Fwd, "shared-memory 128x128"),
            (Kernel::MatmulReg8Fwd, "register 8x8"),
            (Kernel::MatmulVec4NnFwd, "vec4 16x16"),
            (Kernel::MatmulT128v4NnFwd, "vec4 128x128 2-stage"),
            (Kernel::MatmulSg8NnFwd, "vec4 16x16 subgroup"),
            (Kernel::MatmulSg32NnFwd, "vec4 16x16 subgroup x32"),
        ] {
            // The subgroup kernels need subgroups of 8 or more invocations.
            if k.file() == ShaderFile::MatmulSubgroup && !subgroups {
                continue;
            }
            let ms = time(&dev, reps, || a.matmul_with_kernel(&b, k).map(drop))?;
            table.row(
                &format!("matmul {n} {label}"),
                &format!("{n}x{n}x{n}"),
                ms,
                Some((flop, "GFLOP/s")),
            );
        }
        let ms = time(&dev, reps, || a.matmul(&b.t()?).map(drop))?;
        table.row(
            &format!("matmul {n} b^T"),
            &format!("{n}x{n}x{n}"),
            ms,
            Some((flop, "GFLOP/s")),
        );
        // The same product in f16 (accumulating in f32): a frozen half-precision linear layer,
        // on cooperative matrices where the device has them (KILN_COOPERATIVE_MATRIX=1).
        let net = Sequential::from_spec(
            &mut Init::new(&dev, 0),
            &format!("linear({n},{n},bias=false)"),
        )?;
        if let Ok(half) = freeze(net, &a)?.to_half() {
            let ms = time(&dev, reps, || half.predict(&a).map(drop))?;
            let label = if dev.has_cooperative_matrix() {
                "f16 cooperative matrices"
            } else {
                "f16"
            };
            table.row(
                &format!("matmul {n} {label}"),
                &format!("{n}x{n}x{n}"),
                ms,
                Some((flop, "GFLOP/s")),
            );
        }
    }
    // Layer shapes of the MLP at batch 256.
    for (m, k, n) in [(256, 784, 512), (256, 512, 512), (256, 512, 10)] {
        let x = Tensor::randn(&[m, k], 3, &dev)?;
        let w = Tensor::randn(&[n, k], 4, &dev)?;
        let ms = time(&dev, reps, || x.matmul(&w.t()?).map(drop))?;
        table.row(
            &format!("linear {k}->{n} batch {m}"),
            &format!("{m}x{k} @ ({n}x{k})^T"),
            ms,
            Some((2.0 * (m * k * n) as f64, "GFLOP/s")),
        );
    }

    // Convolution at the ResNet-like layer (reduced on a software GPU).
    let (cb, cc, cs) = if software { (2, 16, 28) } else { (64, 64, 56) };
    let x = Tensor::randn(&[cb, cc, cs, cs], 5, &dev)?;
    let w = Tensor::randn(&[cc, cc, 3, 3], 6, &dev)?.mul_scalar(0.05)?;
    let pad = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    let flop = 2.0 * (cb * cc * cs * cs * cc * 9) as f64;
    let shape = format!("{cb}x{cc}x{cs}x{cs}, 3x3, {cc} out");
    let ms = time(&dev, reps, || x.conv2d(&w, None, &pad).map(drop))?;
    table.row("conv2d fwd", &shape, ms, Some((flop, "GFLOP/s")));
    let xg = x.clone().requires_grad();
    let wg = w.clone().requires_grad();
    let ms = time(&dev, reps, || {
        let y = xg.conv2d(&wg, None, &pad)?;
        y.sum_all()?.backward()?;
        xg.zero_grad();
        wg.zero_grad();
        Ok(())
    })?;
    table.row("conv2d fwd+bwd", &shape, ms, Some((3.0 * flop, "GFLOP/s")));

    // Bandwidth.
    let n = if software { 1 << 20 } else { 64 << 20 };
    let a = Tensor::randn(&[n], 7, &dev)?;
    let b = Tensor::randn(&[n], 8, &dev)?;
    let ms = time(&dev, reps, || a.add(&b).map(drop))?;
    table.row(
        "add",
        &format!("{} MiB x 3", (n * 4) >> 20),
        ms,
        Some((12.0 * n as f64, "GB/s")),
    );
    let rows = a.reshape(&[-1, 1024])?;
    let ms = time(&dev, reps, || rows.sum(&[-1], false).map(drop))?;
    table.row(
        "sum rows of 1024",
        &format!("{} MiB", (n * 4) >> 20),
        ms,
        Some((4.0 * n as f64, "GB/s")),
    );

    // The networks: one training step (forward, cross-entropy, backward, SGD momentum 0.9),
    // the training module's eval-mode forward, and frozen inference.
    let batches: &[usize] = if software { &[64] } else { &[64, 256] };
    for (name, spec, input) in [
        ("mlp", MLP, vec![784usize]),
        ("cnn", CNN, vec![1, 28, 28]),
        ("resnet", RESNET, vec![3, 32, 32]),
    ] {
        for &batch in batches {
            let (mut model, mut opt, x, t) = network(&dev, spec, &input, batch)?;
            let shape = x.dims().to_vec();
            let before = dev.stats();
            let ms = time(&dev, reps, || step(&model, &mut opt, &x, &t))?;
            let after = dev.stats();
            if std::env::var_os("KILN_PROFILE").is_some() {
                // One more step, each dispatch timed alone: where the step's time goes.
                print_profile(
                    &dev,
                    &format!("a {name} training step, batch {batch}"),
                    10,
                    || step(&model, &mut opt, &x, &t),
                )?;
            }
            let runs = (reps + 2) as u64;
            table.row(
                &format!("train step {name} batch {batch}"),
                &format!("{shape:?}"),
                ms,
                None,
            );
            println!(
                "    {:.1} dispatches per step; readbacks during steps: {}",
                (after.dispatches - before.dispatches) as f64 / runs as f64,
                after.readbacks - before.readbacks
            );
            // Recording cost on the CPU: record steps without waiting, then wait once.
            dev.synchronize()?;
            let t0 = Instant::now();
            for _ in 0..10 {
                step(&model, &mut opt, &x, &t)?;
            }
            let record_ms = t0.elapsed().as_secs_f64() * 1e3 / 10.0;
            dev.synchronize()?;
            println!("    recording a step on the CPU: {record_ms:.3} ms");
            model.set_training(false);
            let ms = time(&dev, reps, || kiln::no_grad(|| model.forward(&x)).map(drop))?;
            table.row(
                &format!("eval forward {name} batch {batch}"),
                &format!("{shape:?}"),
                ms,
                None,
            );
            drop(opt);
            let frozen = freeze(model, &x)?;
            let ms_frozen = time(&dev, reps, || frozen.predict(&x).map(drop))?;
            table.row(
                &format!("inference {name} batch {batch}"),
                &format!("{shape:?}"),
                ms_frozen,
                None,
            );
            println!(
                "    frozen inference vs eval-mode forward: {:.2}x as fast",
                ms / ms_frozen
            );
            if let Ok(half) = frozen.to_half() {
                let ms16 = time(&dev, reps, || half.predict(&x).map(drop))?;
                table.row(
                    &format!("inference f16 {name} batch {batch}"),
                    &format!("{shape:?}"),
                    ms16,
                    None,
                );
            }
        }
    }

    // Peak GPU memory of the digits example CNN at batch 64, on a device of its own so that
    // nothing else is counted.
    let dev = Device::new(&Default::default())?;
    let spec = "conv2d(1,16,3,p=1) relu conv2d(16,32,3,p=1) relu maxpool2d(2) flatten linear(512,64) relu linear(64,10)";
    let data = kiln::data::digits()?;
    let mut feats = Vec::new();
    for i in 0..64 {
        data.read(i, &mut feats)?;
    }
    let x = Tensor::from_slice(&feats, &[64, 1, 8, 8], &dev)?;
    let t = Tensor::from_slice(
        &(0..64).map(|i| (i % 10) as f32).collect::<Vec<_>>(),
        &[64],
        &dev,
    )?;
    let model = Sequential::from_spec(&mut Init::new(&dev, 0), spec)?;
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    step(&model, &mut opt, &x, &t)?;
    dev.synchronize()?;
    dev.reset_peak_bytes();
    step(&model, &mut opt, &x, &t)?;
    dev.synchronize()?;
    let train_peak = dev.peak_bytes();
    drop(opt);
    let frozen = freeze(model, &x)?;
    frozen.predict(&x)?;
    dev.synchronize()?;
    dev.reset_peak_bytes();
    frozen.predict(&x)?;
    dev.synchronize()?;
    let infer_peak = dev.peak_bytes();
    let half_peak = match frozen.to_half() {
        Ok(h) => {
            h.predict(&x)?;
            dev.synchronize()?;
            dev.reset_peak_bytes();
            h.predict(&x)?;
            dev.synchronize()?;
            format!("{:.1} KiB", dev.peak_bytes() as f64 / 1024.0)
        }
        Err(_) => "n/a (no SHADER_F16)".into(),
    };
    println!(
        "digits CNN, batch 64, peak GPU memory (all live tensors, pool size classes): training step {:.1} KiB, frozen inference f32 {:.1} KiB, f16 {half_peak}",
        train_peak as f64 / 1024.0,
        infer_peak as f64 / 1024.0
    );
    let tuned = Device::default_device()?.tuned_kernels();
    println!("autotuned choices: {}", tuned.len());
    for (family, class, k) in tuned {
        // The family says which operation and operand layouts the choice serves.
        let (what, dims) = match family {
            Kernel::MatmulVec4NnFwd => ("matmul, aligned a @ b", "(m, n, k, batch)"),
            Kernel::MatmulVec4NtFwd => ("matmul, aligned a @ b^T", "(m, n, k, batch)"),
            Kernel::MatmulVec4TnFwd => ("matmul, aligned a^T @ b", "(m, n, k, batch)"),
            Kernel::Conv2dFwd => ("conv2d forward", "(rows, cols, depth, groups)"),
            Kernel::Conv2dBwdInput => ("conv2d input gradient", "(rows, cols, depth, groups)"),
            Kernel::Conv2dBwdWeight => ("conv2d weight gradient", "(rows, cols, depth, groups)"),
            _ => ("matmul, any layout", "(m, n, k, batch)"),
        };
        // For matmuls, the top bit of the batch bucket marks a fused activation.
        let matmul = what.starts_with("matmul");
        let act = if matmul && class[3] & 0x80 != 0 {
            ", fused activation"
        } else {
            ""
        };
        let class = [class[0], class[1], class[2], class[3] & 0x7f];
        println!(
            "    {what}{act}: log2 {dims} buckets {class:?} -> {}",
            k.entry()
        );
    }
    Ok(())
}
