//! Criterion benches: matmul, convolution (forward and both gradients), bandwidth, and the
//! MLP and CNN of the bench table (a training step, the eval-mode forward and frozen
//! inference). Every measured iteration runs its GPU work to completion.
//!
//! `cargo bench`. Sizes shrink on a software (CPU) adapter so the run finishes in minutes;
//! `KILN_BENCH_FULL=1` uses the full sizes anyway. `examples/bench.rs` prints the same
//! workloads as a table with PyTorch ratios.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::infer::freeze;
use kiln::kernels::{Kernel, ShaderFile};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Optimizer, Sgd, SgdOptions};
use kiln::{Conv2dOptions, Device, Tensor};

const MLP: &str = "linear(784,512) relu linear(512,512) relu linear(512,10)";
const CNN: &str = "conv2d(1,32,3,p=1) relu maxpool2d(2) conv2d(32,64,3,p=1) relu maxpool2d(2) flatten linear(3136,128) relu linear(128,10)";
/// A small ResNet: a stem, two basic blocks (the second with a 1x1 stride-2 shortcut), global
/// average pooling and a linear head, with batch norm throughout.
const RESNET: &str = "conv2d(3,16,3,p=1,bias=false) batchnorm2d(16) relu basicblock(16,16) basicblock(16,32,s=2) adaptive_avgpool2d(1,1) flatten linear(32,10)";

fn device() -> (Device, bool) {
    let dev = Device::default_device().expect("a GPU adapter");
    let software = dev.adapter_info().device_type == kiln::wgpu::DeviceType::Cpu
        && std::env::var_os("KILN_BENCH_FULL").is_none();
    (dev, software)
}

fn config<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

fn matmul(c: &mut Criterion) {
    let (dev, software) = device();
    let subgroups = dev.subgroups_of_at_least(8);
    let sizes: &[usize] = if software {
        &[64, 128, 256]
    } else {
        &[256, 1024, 4096]
    };
    let mut g = config(c, "matmul");
    for &n in sizes {
        let a = Tensor::randn(&[n, n], 1, &dev).expect("alloc");
        let b = Tensor::randn(&[n, n], 2, &dev).expect("alloc");
        g.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        g.bench_with_input(BenchmarkId::new("tuned", n), &n, |bench, _| {
            bench.iter(|| {
                let c = a.matmul(&b).expect("matmul");
                dev.synchronize().expect("sync");
                c
            })
        });
        g.bench_with_input(BenchmarkId::new("tuned b^T", n), &n, |bench, _| {
            let bt = b.t().expect("view");
            bench.iter(|| {
                let c = a.matmul(&bt).expect("matmul");
                dev.synchronize().expect("sync");
                c
            })
        });
        for (k, label) in [
            (Kernel::MatmulFwd, "register 4x4"),
            (Kernel::MatmulTiledFwd, "tiled 64"),
            (Kernel::MatmulTiled128Fwd, "tiled 128"),
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
            g.bench_with_input(BenchmarkId::new(label, n), &n, |bench, _| {
                bench.iter(|| {
                    let c = a.matmul_with_kernel(&b, k).expect("matmul");
                    dev.synchronize().expect("sync");
                    c
                })
            });
        }
    }
    // The MLP's layers at batch 256 (x W^T, W read transposed through strides).
    for (m, k, n) in [
        (256usize, 784usize, 512usize),
        (256, 512, 512),
        (256, 512, 10),
    ] {
        let x = Tensor::randn(&[m, k], 3, &dev).expect("alloc");
        let w = Tensor::randn(&[n, k], 4, &dev)
            .expect("alloc")
            .t()
            .expect("view");
        g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        g.bench_function(
            BenchmarkId::new("linear", format!("{m}x{k}->{n}")),
            |bench| {
                bench.iter(|| {
                    let c = x.matmul(&w).expect("matmul");
                    dev.synchronize().expect("sync");
                    c
                })
            },
        );
    }
    g.finish();
}

fn conv(c: &mut Criterion) {
    let (dev, software) = device();
    // A ResNet-like layer and the example CNN's second layer.
    let layers: Vec<(usize, usize, usize, usize)> = if software {
        vec![(2, 16, 16, 28), (16, 32, 64, 14)]
    } else {
        vec![(64, 64, 64, 56), (64, 32, 64, 14)]
    };
    let mut g = config(c, "conv2d");
    let pad = Conv2dOptions {
        padding: [1, 1],
        ..Default::default()
    };
    for (n, ci, co, s) in layers {
        let x = Tensor::randn(&[n, ci, s, s], 5, &dev).expect("alloc");
        let w = Tensor::randn(&[co, ci, 3, 3], 6, &dev).expect("alloc");
        let dy = Tensor::randn(&[n, co, s, s], 7, &dev).expect("alloc");
        let id = format!("{n}x{ci}x{s}x{s}->{co}");
        g.throughput(Throughput::Elements(2 * (n * ci * co * s * s * 9) as u64));
        g.bench_function(BenchmarkId::new("forward", &id), |bench| {
            bench.iter(|| {
                let y = x.conv2d(&w, None, &pad).expect("conv");
                dev.synchronize().expect("sync");
                y
            })
        });
        g.bench_function(BenchmarkId::new("grad input", &id), |bench| {
            let t = kiln::ConvTranspose2dOptions {
                padding: [1, 1],
                ..Default::default()
            };
            bench.iter(|| {
                let dx = dy.conv_transpose2d(&w, None, &t).expect("conv");
                dev.synchronize().expect("sync");
                dx
            })
        });
        g.bench_function(BenchmarkId::new("grad weight", &id), |bench| {
            // The kernel the device would pick at these sizes.
            let kernel = if !software {
                Kernel::Conv2dBwdWeightTiled
            } else if dev.subgroups_of_at_least(8) {
                Kernel::Conv2dSgBwdWeight
            } else {
                Kernel::Conv2dBwdWeight
            };
            bench.iter(|| {
                let dw = dy
                    .conv2d_weight_grad_with(&x, &[co, ci, 3, 3], &pad, kernel, None)
                    .expect("conv");
                dev.synchronize().expect("sync");
                dw
            })
        });
    }
    g.finish();
}

fn bandwidth(c: &mut Criterion) {
    let (dev, software) = device();
    let n = if software { 1 << 18 } else { 64 << 20 };
    let a = Tensor::randn(&[n], 1, &dev).expect("alloc");
    let b = Tensor::randn(&[n], 2, &dev).expect("alloc");
    let mut g = config(c, "bandwidth");
    g.throughput(Throughput::Bytes(12 * n as u64));
    g.bench_function(BenchmarkId::new("add", n), |bench| {
        bench.iter(|| {
            let c = a.add(&b).expect("add");
            dev.synchronize().expect("sync");
            c
        })
    });
    g.throughput(Throughput::Bytes(4 * n as u64));
    let rows = a.reshape(&[-1, 1024]).expect("reshape");
    g.bench_function(BenchmarkId::new("sum rows", n), |bench| {
        bench.iter(|| {
            let s = rows.sum(&[-1], false).expect("sum");
            dev.synchronize().expect("sync");
            s
        })
    });
    g.finish();
}

fn networks(c: &mut Criterion) {
    let (dev, software) = device();
    let mut g = config(c, "networks");
    for (name, spec, input) in [
        ("mlp", MLP, vec![784usize]),
        ("cnn", CNN, vec![1, 28, 28]),
        ("resnet", RESNET, vec![3, 32, 32]),
    ] {
        let batches: &[usize] = match (software, name) {
            (true, "cnn" | "resnet") => &[16],
            (true, _) => &[64],
            _ => &[64, 256],
        };
        for &batch in batches {
            let mut model = Sequential::from_spec(&mut Init::new(&dev, 0), spec).expect("model");
            let mut opt = Sgd::new(
                model.parameters(),
                SgdOptions {
                    lr: 0.01,
                    momentum: 0.9,
                    ..Default::default()
                },
            )
            .expect("sgd");
            let mut shape = vec![batch];
            shape.extend(&input);
            let x = Tensor::randn(&shape, 9, &dev).expect("alloc");
            let t = Tensor::from_slice(
                &(0..batch).map(|i| (i % 10) as f32).collect::<Vec<_>>(),
                &[batch],
                &dev,
            )
            .expect("alloc");
            g.bench_function(
                BenchmarkId::new(format!("{name} train step"), batch),
                |bench| {
                    bench.iter(|| {
                        let loss = kiln::loss::cross_entropy(
                            &model.forward(&x).expect("fwd"),
                            &t,
                            &Default::default(),
                        )
                        .expect("loss");
                        opt.zero_grad();
                        loss.backward().expect("bwd");
                        opt.step().expect("step");
                        dev.synchronize().expect("sync");
                    })
                },
            );
            model.set_training(false);
            g.bench_function(
                BenchmarkId::new(format!("{name} eval forward"), batch),
                |bench| {
                    bench.iter(|| {
                        let y = kiln::no_grad(|| model.forward(&x)).expect("fwd");
                        dev.synchronize().expect("sync");
                        y
                    })
                },
            );
            drop(opt);
            let frozen = freeze(model, &x).expect("freeze");
            g.bench_function(
                BenchmarkId::new(format!("{name} frozen inference"), batch),
                |bench| {
                    bench.iter(|| {
                        let y = frozen.predict(&x).expect("predict");
                        dev.synchronize().expect("sync");
                        y
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, matmul, conv, bandwidth, networks);
criterion_main!(benches);
