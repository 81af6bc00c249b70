//! The runtime: batching, memory reuse, errors instead of panics, devices and threads.

mod common;

use common::*;
use kiln::{Device, DeviceOptions, Error, Tensor};

#[test]
fn a_thousand_small_ops_take_a_handful_of_submits() {
    let d = own_device();
    let mut rng = Rng::new(77);
    let shapes: Vec<Vec<usize>> = (0..10).map(|i| vec![i % 4 + 1, i % 7 + 2]).collect();
    let inputs: Vec<(Tensor, Nd)> = shapes
        .iter()
        .map(|s| {
            let v = rng.vec(s.iter().product(), -1.0, 1.0);
            (Tensor::from_slice(&v, s, &d).unwrap(), Nd::from_f32(s, &v))
        })
        .collect();
    let before = d.stats();
    let mut results = Vec::new();
    for i in 0..1000 {
        let (t, r) = &inputs[i % inputs.len()];
        let (gpu, cpu) = match i % 4 {
            0 => (t.add_scalar(i as f32).unwrap(), r.map(|x| x + i as f64)),
            1 => (t.mul(t).unwrap(), r.map(|x| x * x)),
            2 => (
                t.sum(&[-1], true).unwrap(),
                r.reduce(&[r.shape.len() - 1], |v| v.iter().sum()),
            ),
            _ => (t.relu().unwrap().neg().unwrap(), r.map(|x| -x.max(0.0))),
        };
        results.push((gpu, cpu));
    }
    // Keep a few results to check after a single readback.
    let total = Tensor::concat(
        &results
            .iter()
            .rev()
            .take(8)
            .map(|(g, _)| g.reshape(&[-1]).unwrap())
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let values = total.to_vec().unwrap();
    let after = d.stats();
    let submits = after.submits - before.submits;
    assert!(after.dispatches - before.dispatches >= 1000);
    assert!(submits <= 4, "{submits} submits for 1000 ops");
    assert_eq!(after.readbacks - before.readbacks, 1);
    let want: Vec<f64> = results
        .iter()
        .rev()
        .take(8)
        .flat_map(|(_, c)| c.data.clone())
        .collect();
    assert_close_slice("batched results", &values, &want, 1e-5, 1e-5);
    for (i, (g, c)) in results.iter().enumerate().step_by(97) {
        assert_close(&format!("op {i}"), g, c, 1e-5, 1e-5);
    }
}

#[test]
fn live_bytes_stay_flat_over_ten_thousand_iterations() {
    let d = own_device();
    let data: Vec<f32> = (0..300).map(|i| i as f32 * 0.01).collect();
    let mut live_after_warmup = 0;
    let mut pooled_after_warmup = 0;
    for i in 0..10_000 {
        let a = Tensor::from_slice(&data, &[3, 100], &d).unwrap();
        let b = a.exp().unwrap().sum(&[1], false).unwrap();
        let c = b.add_scalar(1.0).unwrap();
        if i % 2500 == 0 {
            let v = c.to_vec().unwrap();
            assert!(
                (v[0] as f64 - (1.0 + (0..100).map(|k| (k as f64 * 0.01).exp()).sum::<f64>()))
                    .abs()
                    < 1e-3
            );
        }
        drop((a, b, c));
        if i == 1000 {
            d.synchronize().unwrap();
            live_after_warmup = d.live_bytes();
            pooled_after_warmup = d.stats().pooled_bytes;
        }
    }
    d.synchronize().unwrap();
    assert_eq!(d.live_bytes(), 0, "all tensors dropped");
    assert_eq!(live_after_warmup, 0);
    let s = d.stats();
    assert!(
        s.pooled_bytes <= pooled_after_warmup.max(1) * 2,
        "pool grew from {pooled_after_warmup} to {}",
        s.pooled_bytes
    );
    // Peak: at most one batch's worth of buffers, not 10,000 iterations' worth.
    assert!(s.peak_bytes < 4 << 20, "peak {} bytes", s.peak_bytes);
}

#[test]
fn oversized_tensors_are_err() {
    let d = dev();
    let limit = d.limits().max_storage_buffer_binding_size as usize;
    match Tensor::zeros(&[limit / 4 + 1], &d) {
        Err(Error::TooLarge {
            bytes, limit: l, ..
        }) => assert!(bytes > l as u128),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(
        Tensor::zeros(&[usize::MAX, 4], &d),
        Err(Error::TooLarge { .. })
    ));
    // A view with more elements than kernels can index is refused when made.
    let big = Tensor::zeros(&[1], &d).unwrap().expand(&[1 << 20, 1 << 20]);
    assert!(big.is_err_and(|e| e.to_string().contains("expand")));
    assert!(
        Tensor::zeros(&[1; 9], &d).is_err(),
        "rank 9 exceeds the kernels' limit"
    );
}

#[test]
fn an_adapter_filter_that_matches_nothing_is_err() {
    let opts = DeviceOptions {
        adapter: Some("no-such-adapter-anywhere".into()),
        ..Default::default()
    };
    let e = Device::new(&opts).unwrap_err();
    assert!(matches!(e, Error::NoAdapter { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("no-such-adapter-anywhere") && msg.contains("mesa-vulkan-drivers"),
        "{msg}"
    );
    // The adapters that do exist are listed.
    assert!(msg.contains(&dev().adapter_info().name), "{msg}");
}

#[test]
fn mixing_devices_is_err() {
    let a = Tensor::ones(&[2], &dev()).unwrap();
    let other = own_device();
    let b = Tensor::ones(&[2], &other).unwrap();
    for r in [
        a.add(&b),
        a.matmul(&b),
        Tensor::concat(&[&a, &b], 0),
        a.where_cond(&a, &b),
        a.gather(0, &b),
    ] {
        assert!(matches!(r, Err(Error::DeviceMismatch { .. })));
    }
}

#[test]
fn threads_share_a_device() {
    let handles: Vec<_> = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                let d = dev();
                for i in 0..50 {
                    let t = Tensor::full(&[17, 3], (k * 100 + i) as f32, &d).unwrap();
                    let s = t.sum(&[], false).unwrap().to_scalar().unwrap();
                    assert_eq!(s, 51.0 * (k * 100 + i) as f32);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn default_device_is_shared_and_reports_itself() {
    let a = dev();
    let b = dev();
    assert!(a.same(&b));
    assert!(!a.same(&own_device()));
    assert!(!a.name().is_empty());
    assert!(a.limits().max_storage_buffer_binding_size >= 128 << 20);
}

/// Profiling: every dispatch lands in its kernel's row (the calls add up to the dispatch
/// counter), times are positive, rows come most expensive first, and turning it off clears it.
#[test]
fn profiling_counts_every_dispatch() {
    let d = own_device();
    let spec = "conv2d(1,4,3,p=1) relu maxpool2d(2) flatten linear(16,3)";
    let net = kiln::nn::Sequential::from_spec(&mut kiln::nn::Init::new(&d, 0), spec).unwrap();
    let x = Tensor::randn(&[2, 1, 4, 4], 1, &d).unwrap();
    use kiln::nn::Module;
    net.forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    d.synchronize().unwrap();
    d.set_profiling(true);
    let before = d.stats().dispatches;
    let y = net.forward(&x).unwrap().sum_all().unwrap();
    y.backward().unwrap();
    d.synchronize().unwrap();
    let dispatched = d.stats().dispatches - before;
    let table = d.profile();
    assert!(!table.is_empty());
    assert_eq!(table.iter().map(|r| r.calls).sum::<u64>(), dispatched);
    assert!(table.iter().all(|r| r.seconds > 0.0 && r.calls > 0));
    assert!(
        table.windows(2).all(|w| w[0].seconds >= w[1].seconds),
        "sorted by time"
    );
    assert!(table.iter().any(|r| r.kernel.contains("conv")), "{table:?}");
    d.set_profiling(false);
    assert!(d.profile().is_empty());
}
