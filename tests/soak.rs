//! A short soak (the `soak` example runs the long one): 3,000 training steps, then 3,000
//! frozen calls over 100 batch sizes. GPU live bytes stay the same and the process's
//! resident memory within 5% after warm-up. One test in its own binary, so no other test
//! moves the process's memory meanwhile.

mod common;

use common::*;
use kiln::infer::freeze;
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Optimizer, Sgd, SgdOptions};
use kiln::Tensor;

fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    Some(s.split_whitespace().nth(1)?.parse::<u64>().ok()? * 4)
}

#[test]
fn memory_stays_flat_over_training_and_serving() {
    let d = own_device();
    let model =
        Sequential::from_spec(&mut Init::new(&d, 0), "linear(16,32) relu linear(32,4)").unwrap();
    let mut opt = Sgd::new(
        model.parameters(),
        SgdOptions {
            lr: 0.01,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    let x = Tensor::randn(&[32, 16], 1, &d).unwrap();
    let t = Tensor::from_slice(
        &(0..32).map(|i| (i % 4) as f32).collect::<Vec<_>>(),
        &[32],
        &d,
    )
    .unwrap();
    let mut marks = Vec::new();
    for step in 1..=3000 {
        let loss = kiln::loss::cross_entropy(&model.forward(&x).unwrap(), &t, &Default::default())
            .unwrap();
        opt.zero_grad();
        loss.backward().unwrap();
        opt.step().unwrap();
        if step % 500 == 0 {
            d.synchronize().unwrap();
            marks.push(("train", d.live_bytes(), rss_kib()));
        }
    }
    drop(opt);
    let frozen = freeze(model, &x).unwrap();
    for call in 1..=3000 {
        let n = 1 + call % 100;
        frozen
            .predict(&Tensor::randn(&[n, 16], call as u64, &d).unwrap())
            .unwrap();
        if call % 500 == 0 {
            d.synchronize().unwrap();
            marks.push(("serve", d.live_bytes(), rss_kib()));
        }
    }
    // After the first mark of each phase (warm-up), live bytes are exact and RSS within 5%.
    for phase in ["train", "serve"] {
        let m: Vec<_> = marks.iter().filter(|(p, _, _)| *p == phase).collect();
        let (_, live0, rss0) = m[0];
        for (_, live, rss) in &m[1..] {
            assert_eq!(live, live0, "{phase}: {marks:?}");
            if let (Some(r0), Some(r)) = (rss0, rss) {
                assert!((*r as f64) <= *r0 as f64 * 1.05, "{phase}: {marks:?}");
            }
        }
    }
}
