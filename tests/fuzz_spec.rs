//! Fuzz of architecture spec strings: 2,000 strings, from valid ones mutated character by
//! character to hostile numbers, are parsed and (when small enough to build) built and run.
//! Parsing agrees with an independent count of the layers; nothing panics.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use kiln::nn::{Init, Module, Sequential};
use kiln::Tensor;

const LAYERS: &[&str] = &[
    "linear(16,8)",
    "linear(8,4,bias=false)",
    "conv2d(1,4,3,p=1)",
    "conv2d(4,4,3,s=2,d=1,g=2)",
    "conv_transpose2d(4,2,2,s=2)",
    "batchnorm2d(4)",
    "batchnorm1d(8,eps=1e-3,momentum=0.2)",
    "layernorm(8)",
    "maxpool2d(2)",
    "avgpool2d(2,s=1,p=1)",
    "adaptive_avgpool2d(1,1)",
    "flatten",
    "flatten(start=2)",
    "dropout(0.5)",
    "embedding(10,4)",
    "basicblock(4,4)",
    "relu",
    "gelu",
    "tanh",
    "sigmoid",
    "silu",
    "leaky_relu(slope=0.2)",
];

const NOISE: &[&str] = &[
    "(",
    ")",
    ",",
    "=",
    " ",
    "-1",
    "0",
    "1e40",
    "nan",
    "inf",
    "18446744073709551616",
    "9223372036854775808",
    "4294967296",
    "s=",
    "p=0",
    "bias=maybe",
    "é",
    "\u{0}",
    "((",
    "))",
];

/// Layers separated by whitespace at depth 0, counted without kiln's parser.
fn count_layers(spec: &str) -> usize {
    let (mut depth, mut count, mut in_token) = (0i32, 0, false);
    for c in spec.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            c if c.is_whitespace() && depth == 0 => {
                in_token = false;
                continue;
            }
            _ => {}
        }
        if !in_token {
            count += 1;
            in_token = true;
        }
    }
    count
}

fn generate(rng: &mut Rng) -> String {
    let n = 1 + rng.below(5);
    let mut s: Vec<String> = (0..n)
        .map(|_| LAYERS[rng.below(LAYERS.len())].to_string())
        .collect();
    let mut text = s.join(" ");
    match rng.below(4) {
        // Valid as generated.
        0 => {}
        // Characters deleted, inserted or replaced.
        1 => {
            for _ in 0..1 + rng.below(3) {
                let mut chars: Vec<char> = text.chars().collect();
                let at = rng.below(chars.len() + 1);
                match rng.below(3) {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 => chars.insert(at, "(),= x1-".chars().nth(rng.below(8)).unwrap()),
                    _ if at < chars.len() => chars[at] = "0a9,)".chars().nth(rng.below(5)).unwrap(),
                    _ => {}
                }
                text = chars.into_iter().collect();
            }
        }
        // A hostile token spliced in.
        2 => {
            let k = rng.below(s.len());
            let noise = NOISE[rng.below(NOISE.len())];
            s[k] = match s[k].find('(') {
                Some(i) if rng.below(2) == 0 => {
                    format!("{}{noise},{}", &s[k][..=i], &s[k][i + 1..])
                }
                _ => format!("{}{noise}", s[k]),
            };
            text = s.join(" ");
        }
        // Numbers replaced by huge or zero ones.
        _ => {
            let big = [
                "0",
                "18446744073709551615",
                "4294967297",
                "65536",
                "99999999999999999999",
            ];
            let b = big[rng.below(big.len())];
            let digits: Vec<usize> = text
                .char_indices()
                .filter(|(_, c)| c.is_ascii_digit())
                .map(|(i, _)| i)
                .collect();
            if !digits.is_empty() {
                let at = digits[rng.below(digits.len())];
                text.replace_range(at..at + 1, b);
            }
        }
    }
    text
}

/// Every number in the spec is small: the model can be built without large allocations.
fn small(spec: &str) -> bool {
    spec.split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .all(|t| t.len() <= 2)
}

#[test]
fn hostile_specs_are_err_never_panics() {
    let d = dev();
    let mut rng = Rng::new(21);
    let (mut parsed, mut built, mut ran) = (0, 0, 0);
    let mut failures = Vec::new();
    let inputs = [
        Tensor::randn(&[2, 16], 1, &d).unwrap(),
        Tensor::randn(&[2, 1, 8, 8], 2, &d).unwrap(),
        Tensor::randn(&[2, 4, 8, 8], 3, &d).unwrap(),
    ];
    for case in 0..2000 {
        let spec = generate(&mut rng);
        let layers = match catch_unwind(|| kiln::spec::parse(&spec)) {
            Err(_) => {
                failures.push(format!("parse panicked on {spec:?}"));
                continue;
            }
            Ok(Err(e)) => {
                if e.to_string().is_empty() {
                    failures.push(format!("empty error for {spec:?}"));
                }
                continue;
            }
            Ok(Ok(l)) => l,
        };
        parsed += 1;
        if layers.len() != count_layers(&spec) {
            failures.push(format!(
                "{spec:?}: {} layers parsed, {} written",
                layers.len(),
                count_layers(&spec)
            ));
        }
        if !small(&spec) {
            continue;
        }
        let model = match catch_unwind(AssertUnwindSafe(|| {
            Sequential::from_spec(&mut Init::new(&d, case), &spec)
        })) {
            Err(_) => {
                failures.push(format!("build panicked on {spec:?}"));
                continue;
            }
            Ok(Err(_)) => continue,
            Ok(Ok(m)) => m,
        };
        built += 1;
        if model.len() != layers.len() {
            failures.push(format!(
                "{spec:?}: {} modules for {} layers",
                model.len(),
                layers.len()
            ));
        }
        for x in &inputs {
            match catch_unwind(AssertUnwindSafe(|| {
                kiln::no_grad(|| model.forward(x)).and_then(|y| y.to_vec())
            })) {
                Err(_) => {
                    failures.push(format!("forward panicked on {spec:?} with {:?}", x.dims()))
                }
                Ok(Ok(_)) => ran += 1,
                Ok(Err(_)) => {}
            }
        }
    }
    eprintln!(
        "2000 specs: {parsed} parsed, {built} built, {ran} forward passes ran, {} failures",
        failures.len()
    );
    assert!(
        parsed > 200 && built > 100 && ran > 50,
        "the generator reaches too little"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
