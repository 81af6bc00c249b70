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

    // Without SHADER_F16, converting a frozen model to f16 is the documented Err.
    let f = freeze(
        Sequential::from_spec(&mut Init::new(&d, 0), "linear(2,2)").unwrap(),
        &Tensor::ones(&[1, 2], &d).unwrap(),
    )
    .unwrap();
    let half = f.to_half();
    if d.features().contains(Features::SHADER_F16) {
        assert!(half.is_ok(), "{:?}", half.err());
    } else {
        let e = half.err().unwrap().to_string();
        assert!(e.contains("has no SHADER_F16 feature"), "{e}");
    }
}
