//! Reports, once per test run, the adapter and the optional features the suite ran with, and
//! checks that each absent feature is refused with its documented `Err`.

mod common;

use std::io::Write;

use common::*;
use kiln::infer::freeze;
use kiln::nn::{Init, Sequential};
use kiln::wgpu::Features;
use kiln::Tensor;

#[test]
fn adapter_and_features_are_reported() {
    let d = dev();
    let info = d.adapter_info();
    let has = |f: Features| {
        if d.features().contains(f) {
            "yes"
        } else {
            "no"
        }
    };
    let line = format!(
        "kiln tests ran on: {} ({:?}, {:?}, driver {} {}); SHADER_F16: {}, SUBGROUP: {} \
         (sizes {}..={}), TIMESTAMP_QUERY: {}\n",
        info.name,
        info.backend,
        info.device_type,
        info.driver,
        info.driver_info,
        has(Features::SHADER_F16),
        has(Features::SUBGROUP),
        info.subgroup_min_size,
        info.subgroup_max_size,
        has(Features::TIMESTAMP_QUERY),
    );
    // Written past the test harness's capture, so that every run's log shows it.
    std::io::stderr().write_all(line.as_bytes()).unwrap();

    // With SHADER_F16 a frozen model converts to f16; without, that is the documented Err.
    let f = freeze(
        Sequential::from_spec(&mut Init::new(&d, 0), "linear(2,2)").unwrap(),
        &Tensor::ones(&[1, 2], &d).unwrap(),
    )
    .unwrap();
    let half = to_half_or_refused(f);
    assert_eq!(half.is_some(), d.features().contains(Features::SHADER_F16));
}

/// The paths of an adapter without the optional features, run on this one by leaving them
/// off: f16 conversion and the subgroup kernels are refused with their documented `Err`, and
/// the kernels chosen instead (matmul, convolution, autotuned or not) give the f64 values.
#[test]
fn without_optional_features_the_documented_errs_and_fallbacks() {
    use kiln::kernels::Kernel;
    use kiln::{Conv2dOptions, DeviceOptions};
    let d = kiln::Device::new(&DeviceOptions {
        without_features: Features::SHADER_F16 | Features::SUBGROUP,
        ..Default::default()
    })
    .unwrap();
    assert!(!d
        .features()
        .intersects(Features::SHADER_F16 | Features::SUBGROUP));
    assert!(!d.subgroups_of_at_least(1));
    let f = freeze(
        Sequential::from_spec(&mut Init::new(&d, 0), "linear(3,2) relu").unwrap(),
        &Tensor::ones(&[1, 3], &d).unwrap(),
    )
    .unwrap();
    assert!(to_half_or_refused(f).is_none());
    let mut rng = Rng::new(1);
    let (m, k, n) = (16, 12, 8);
    let (av, bv) = (rng.vec(m * k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0));
    let a = Tensor::from_slice(&av, &[m, k], &d).unwrap();
    let b = Tensor::from_slice(&bv, &[k, n], &d).unwrap();
    for kernel in [Kernel::MatmulSg8NnFwd, Kernel::MatmulSg32NnFwd] {
        let e = a.matmul_with_kernel(&b, kernel).err().unwrap().to_string();
        assert!(e.to_lowercase().contains("subgroup"), "{kernel:?}: {e}");
    }
    let want = Nd::from_f32(&[m, k], &av).matmul(&Nd::from_f32(&[k, n], &bv));
    for autotune in [false, true] {
        d.set_autotune(autotune);
        assert_close(
            "matmul without subgroups",
            &a.matmul(&b).unwrap(),
            &want,
            1e-5,
            1e-5,
        );
    }
    let x = Tensor::randn(&[1, 2, 5, 5], 2, &d).unwrap();
    let w = Tensor::randn(&[3, 2, 3, 3], 3, &d).unwrap();
    let opts = Conv2dOptions::default();
    assert!(x
        .conv2d_forward_with(&w, &opts, Kernel::Conv2dSgFwd)
        .is_err());
    let y = x.conv2d(&w, None, &opts).unwrap();
    let reference = x.conv2d_forward_with(&w, &opts, Kernel::Conv2dFwd).unwrap();
    assert_eq!(y.dims(), &[1, 3, 3, 3]);
    assert_eq!(y.to_vec().unwrap(), reference.to_vec().unwrap());
}
