//! Int8 quantization semantics against ONNX Runtime's quantization tools
//! (tests/fixtures/gen_quant.py): scales and zero points of activations (asymmetric, per
//! tensor, from the MinMax range) and weights (symmetric, per output channel), the quantized
//! values (round half to even, saturation), and dequantization within half a step.

use kiln::quant::{weight_params, QParams};

struct Case {
    name: String,
    kind: String,
    channels: usize,
    x: Vec<f32>,
    scales: Vec<f32>,
    zero_points: Vec<i32>,
    q: Vec<i8>,
}

fn cases() -> Vec<Case> {
    let text = include_str!("fixtures/quant.txt");
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    lines
        .chunks(3)
        .map(|c| {
            let head: Vec<&str> = c[0].split_whitespace().collect();
            let x: Vec<f32> = c[1]
                .split_whitespace()
                .skip(2)
                .map(|v| v.parse().unwrap())
                .collect();
            let q: Vec<&str> = c[2].split_whitespace().collect();
            Case {
                name: head[1].into(),
                kind: head[2].into(),
                channels: head[3].parse().unwrap(),
                x,
                scales: q[1].split(',').map(|v| v.parse().unwrap()).collect(),
                zero_points: q[2].split(',').map(|v| v.parse().unwrap()).collect(),
                q: q[3..].iter().map(|v| v.parse().unwrap()).collect(),
            }
        })
        .collect()
}

#[test]
fn quantization_matches_onnx_runtime() {
    let all = cases();
    assert_eq!(all.len(), 8, "fixture cases");
    for c in &all {
        let params: Vec<QParams> = if c.kind == "activation" {
            let min = c.x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = c.x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            vec![QParams::asymmetric(min, max).unwrap()]
        } else {
            weight_params(&c.x, c.channels).unwrap()
        };
        assert_eq!(params.len(), c.scales.len(), "{}", c.name);
        for (p, (&s, &z)) in params.iter().zip(c.scales.iter().zip(&c.zero_points)) {
            assert_eq!(
                (p.scale, p.zero_point),
                (s, z),
                "{}: scale and zero point",
                c.name
            );
        }
        let per = c.x.len() / params.len();
        for (i, (&x, &want)) in c.x.iter().zip(&c.q).enumerate() {
            let p = params[i / per];
            let got = p.quantize(x);
            assert_eq!(got, want, "{} element {i}: {x} quantized", c.name);
            // Values inside the range come back within half a step.
            let back = p.dequantize(got);
            if want > -128 && want < 127 {
                assert!(
                    (back - x).abs() <= p.scale * 0.5001,
                    "{}: {x} -> {back}",
                    c.name
                );
            }
        }
    }
}

#[test]
fn bad_ranges_are_errors() {
    assert!(QParams::asymmetric(2.0, 1.0).is_err());
    assert!(QParams::asymmetric(0.0, f32::INFINITY).is_err());
    assert!(QParams::symmetric(f32::NAN).is_err());
    assert!(weight_params(&[1.0, 2.0, 3.0], 2).is_err());
    assert!(weight_params(&[], 0).is_err());
}
