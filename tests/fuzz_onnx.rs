//! Fuzz of ONNX import: hundreds of mutated variants of the committed ONNX files (PyTorch's
//! exports and kiln's): truncations, flipped bytes, unknown ops, wrong attribute types,
//! renamed (dangling) value names, deleted and duplicated chunks. Each is loaded and, when it
//! loads, run. None may panic: a malformed file is an `Err` from `load_onnx` or, for a graph
//! that loads but cannot run on the given input, from `predict`.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use common::*;
use kiln::infer::InferenceModel;
use kiln::Tensor;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name)
}

/// The first input of a fixture text file (its shape and values).
fn first_input(name: &str) -> (Vec<usize>, Vec<f32>) {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("in "))
        .expect("an input line");
    let f: Vec<&str> = line.split_whitespace().collect();
    let a = parse_array(&f[1..]);
    (a.shape.clone(), a.data.iter().map(|&v| v as f32).collect())
}

/// Positions of protobuf strings of printable ASCII with the given field key byte.
fn strings(bytes: &[u8], key: u8) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for i in 0..bytes.len().saturating_sub(2) {
        let len = bytes[i + 1] as usize;
        if bytes[i] != key || !(1..100).contains(&len) || i + 2 + len > bytes.len() {
            continue;
        }
        let s = &bytes[i + 2..i + 2 + len];
        if s.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
        {
            out.push((i + 2, len));
        }
    }
    out
}

#[test]
fn mutated_onnx_files_never_panic() {
    let d = dev();
    let names = [
        "resnet",
        "mobilenet",
        "transformer",
        "mlp",
        "ops",
        "kiln_digits",
        "kiln_resnet",
        "kiln_transformer",
        "kiln_zoo",
    ];
    let mut rng = Rng::new(2026);
    let (mut cases, mut load_errs, mut run_errs, mut ran) = (0, 0, 0, 0);
    let mut panics: Vec<String> = Vec::new();
    for name in names {
        let bytes = std::fs::read(fixture(&format!("{name}.onnx"))).unwrap();
        let (shape, data) = first_input(&format!("{name}.txt"));
        let x = Tensor::from_slice(&data, &shape, &d).unwrap();
        // NodeProto.op_type (field 4) and value names (input 1, output 2 of a node; name 1 of
        // a value info or tensor).
        let ops = strings(&bytes, 0x22);
        let names_at = strings(&bytes, 0x0a);
        // AttributeProto.type (field 20, varint): key bytes 0xa0 0x01.
        let types: Vec<usize> = (0..bytes.len().saturating_sub(2))
            .filter(|&i| bytes[i] == 0xa0 && bytes[i + 1] == 0x01 && bytes[i + 2] <= 14)
            .map(|i| i + 2)
            .collect();
        assert!(
            !ops.is_empty() && !names_at.is_empty() && !types.is_empty(),
            "{name}"
        );
        let mut variants: Vec<(String, Vec<u8>)> = Vec::new();
        for k in 0..10 {
            let cut = rng.below(bytes.len());
            variants.push((format!("truncated at {cut} ({k})"), bytes[..cut].to_vec()));
        }
        for _ in 0..25 {
            let mut b = bytes.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
            variants.push(("flipped bits".into(), b));
        }
        for _ in 0..8 {
            let (at, len) = ops[rng.below(ops.len())];
            let mut b = bytes.clone();
            b[at + rng.below(len)] = b'Q';
            variants.push((format!("unknown op at {at}"), b));
        }
        for _ in 0..10 {
            let at = types[rng.below(types.len())];
            let mut b = bytes.clone();
            b[at] = 1 + rng.below(14) as u8;
            variants.push((format!("attribute type {} at {at}", b[at]), b));
        }
        for _ in 0..12 {
            let (at, len) = names_at[rng.below(names_at.len())];
            let mut b = bytes.clone();
            b[at + rng.below(len)] = b'~';
            variants.push((format!("renamed value at {at}"), b));
        }
        for _ in 0..8 {
            let a = rng.below(bytes.len());
            let len = 1 + rng.below(64.min(bytes.len() - a));
            let mut b = bytes.clone();
            if rng.below(2) == 0 {
                b.drain(a..a + len);
                variants.push((format!("deleted {len} bytes at {a}"), b));
            } else {
                let chunk = b[a..a + len].to_vec();
                b.splice(a..a, chunk);
                variants.push((format!("duplicated {len} bytes at {a}"), b));
            }
        }
        for (what, b) in variants {
            cases += 1;
            let r = catch_unwind(AssertUnwindSafe(|| {
                match InferenceModel::from_onnx_bytes(&b, &d) {
                    Err(_) => 0,
                    Ok(m) => match m.predict(&x).and_then(|y| y.to_vec()) {
                        Err(_) => 1,
                        Ok(_) => 2,
                    },
                }
            }));
            match r {
                Ok(0) => load_errs += 1,
                Ok(1) => run_errs += 1,
                Ok(_) => ran += 1,
                Err(_) => panics.push(format!("{name}: {what}")),
            }
        }
    }
    println!(
        "{cases} mutated files: {load_errs} refused at load, {run_errs} refused at run, {ran} ran"
    );
    assert!(panics.is_empty(), "{} panics: {panics:#?}", panics.len());
    assert!(cases >= 600, "{cases} cases");
    // The mutations reach both outcomes: most are refused, some still load and run.
    assert!(
        load_errs > cases / 3 && ran > 0,
        "{load_errs} refused, {ran} ran"
    );
}
