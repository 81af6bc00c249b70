//! Kernel benchmarks: matmul, elementwise and reduction throughput.
//!
//! `cargo bench`. Sizes shrink on a software (CPU) adapter so the run finishes in minutes;
//! set `KILN_BENCH_FULL=1` to use the full sizes anyway.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::{Device, Tensor};

fn software(dev: &Device) -> bool {
    dev.adapter_info().device_type == wgpu::DeviceType::Cpu
        && std::env::var_os("KILN_BENCH_FULL").is_none()
}

fn matmul(c: &mut Criterion) {
    let dev = Device::default_device().expect("a GPU adapter");
    let sizes: &[usize] = if software(&dev) {
        &[64, 128, 256]
    } else {
        &[256, 1024, 4096]
    };
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10);
    for &n in sizes {
        let a = Tensor::randn(&[n, n], 1, &dev).expect("alloc");
        let b = Tensor::randn(&[n, n], 2, &dev).expect("alloc");
        g.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        g.bench_with_input(BenchmarkId::new("square", n), &n, |bench, _| {
            bench.iter(|| {
                let c = a.matmul(&b).expect("matmul");
                dev.synchronize().expect("sync");
                c
            })
        });
    }
    g.finish();
}

fn elementwise_and_reduce(c: &mut Criterion) {
    let dev = Device::default_device().expect("a GPU adapter");
    let n = if software(&dev) { 1 << 18 } else { 1 << 26 };
    let a = Tensor::randn(&[n], 1, &dev).expect("alloc");
    let b = Tensor::randn(&[n], 2, &dev).expect("alloc");
    let mut g = c.benchmark_group("bandwidth");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(12 * n as u64));
    g.bench_function(BenchmarkId::new("add", n), |bench| {
        bench.iter(|| {
            let c = a.add(&b).expect("add");
            dev.synchronize().expect("sync");
            c
        })
    });
    g.throughput(Throughput::Bytes(4 * n as u64));
    g.bench_function(BenchmarkId::new("sum_rows", n), |bench| {
        let m = a.reshape(&[-1, 1024]).expect("reshape");
        bench.iter(|| {
            let s = m.sum(&[-1], false).expect("sum");
            dev.synchronize().expect("sync");
            s
        })
    });
    g.finish();
}

criterion_group!(benches, matmul, elementwise_and_reduce);
criterion_main!(benches);
