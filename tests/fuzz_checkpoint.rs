//! Fuzz of checkpoint files: 2,000 corrupt or hostile variants of a real checkpoint (the
//! weights file with batch norm buffers, an integer counter and a spec, and the optimizer file
//! with Adam state, step count and learning rate; one of the two is mutated in each case) are
//! read and loaded into a model and optimizer. Each is an `Err` that leaves the model and optimizer untouched, or `Ok` with the
//! values an independent reader of the format finds in the file. No case may panic.

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Adam, AdamOptions, Optimizer};
use kiln::Tensor;
use serde_json::{json, Value};

const SPEC: &str = "conv2d(1,2,3) batchnorm2d(2) relu flatten linear(8,3)";

fn model(seed: u64) -> Sequential {
    Sequential::from_spec(&mut Init::new(&dev(), seed), SPEC).unwrap()
}

/// The weights and optimizer files of a model after one Adam step (so batch norm and
/// optimizer state are non-trivial).
fn base_files() -> (Vec<u8>, Vec<u8>) {
    let d = dev();
    let m = model(1);
    let mut opt = Adam::new(m.parameters(), AdamOptions::default()).unwrap();
    let x = Tensor::randn(&[3, 1, 4, 4], 2, &d).unwrap();
    let loss = m.forward(&x).unwrap().square().unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    opt.step().unwrap();
    (
        kiln::checkpoint::to_bytes(&m, Some(SPEC)).unwrap(),
        kiln::checkpoint::optimizer_to_bytes(&opt).unwrap(),
    )
}

/// Tensors by name: shape and values.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// An independent reader: the tensors of a safetensors file as f32, or `None` when the file
/// breaks the format (length prefix, JSON header, dtype, shape against data offsets).
fn reference(bytes: &[u8]) -> Option<Tensors> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: Value = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (name, t) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = t["shape"]
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()?;
        let offsets = t["data_offsets"].as_array()?;
        let (a, b) = (
            offsets.first()?.as_u64()? as usize,
            offsets.get(1)?.as_u64()? as usize,
        );
        let raw = data.get(a..b)?;
        let size = match t["dtype"].as_str()? {
            "F32" | "I32" => 4,
            "F64" | "I64" => 8,
            "F16" | "BF16" => 2,
            _ => return None,
        };
        let numel = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d))?;
        if numel.checked_mul(size)? != raw.len() {
            return None;
        }
        let values: Vec<f32> = raw
            .chunks_exact(size)
            .map(|c| match t["dtype"].as_str().unwrap() {
                "F32" => f32::from_le_bytes(c.try_into().unwrap()),
                "I32" => i32::from_le_bytes(c.try_into().unwrap()) as f32,
                "F64" => f64::from_le_bytes(c.try_into().unwrap()) as f32,
                "I64" => i64::from_le_bytes(c.try_into().unwrap()) as f32,
                "F16" => half::f16::from_le_bytes(c.try_into().unwrap()).to_f32(),
                _ => half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32(),
            })
            .collect();
        out.insert(name.clone(), (shape, values));
    }
    Some(out)
}

fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn join_raw(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    join_raw(&h, data)
}

/// One mutation of the header or the bytes; returns the file and what was done.
fn mutate(base: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let (header, data) = split(base);
    let names: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let name = names[rng.below(names.len())].clone();
    let mut h = header.clone();
    match rng.below(12) {
        0 => {
            let cut = rng.below(base.len());
            (base[..cut].to_vec(), format!("truncated to {cut}"))
        }
        1 => {
            let mut b = base.to_vec();
            let k = 1 + rng.below(6);
            for _ in 0..k {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
            (b, format!("{k} flipped bits"))
        }
        2 => {
            let dtypes = [
                "F16", "F64", "I32", "I64", "BF16", "U8", "BOOL", "F8_E4M3", "nope",
            ];
            let dt = dtypes[rng.below(dtypes.len())];
            h[&name]["dtype"] = json!(dt);
            (join(&h, &data), format!("{name} dtype {dt}"))
        }
        3 => {
            let shapes = [
                json!([]),
                json!([0]),
                json!([1u64 << 40, 1u64 << 40]),
                json!([3, 3]),
                json!([-1]),
                json!(["a"]),
            ];
            let s = shapes[rng.below(shapes.len())].clone();
            h[&name]["shape"] = s.clone();
            (join(&h, &data), format!("{name} shape {s}"))
        }
        4 => {
            let len = data.len() as u64;
            let offs = [
                json!([0, 0]),
                json!([4, 0]),
                json!([0, len + 4]),
                json!([len, len]),
                json!([0, u64::MAX]),
                json!([2, 6]),
            ];
            let o = offs[rng.below(offs.len())].clone();
            h[&name]["data_offsets"] = o.clone();
            (join(&h, &data), format!("{name} offsets {o}"))
        }
        5 => {
            h.as_object_mut().unwrap().remove(&name);
            (join(&h, &data), format!("{name} missing"))
        }
        6 => {
            let mut extra = h[&name].clone();
            extra["dtype"] = json!("F32");
            h["extra.weight"] = extra;
            (join(&h, &data), "an extra tensor".into())
        }
        7 => {
            // A duplicate name, written into the JSON text (a map cannot hold it).
            let text = serde_json::to_string(&header).unwrap();
            let entry = format!("\"{name}\":{}", header[&name]);
            let dup = text.replacen('{', &format!("{{{entry},"), 1);
            (join_raw(dup.as_bytes(), &data), format!("{name} twice"))
        }
        8 => {
            let mut b = base.to_vec();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap());
            let lies = [0, 1, n - 1, n + 1, n * 2, u64::MAX, 1 << 40];
            let l = lies[rng.below(lies.len())];
            b[..8].copy_from_slice(&l.to_le_bytes());
            (b, format!("header length {l}"))
        }
        9 => {
            let specs = [
                "",
                "linear(1,1)",
                "conv2d(1,2,3,s=0)",
                "\u{0}",
                "linear(8,3) linear(99999999999,3)",
            ];
            let s = specs[rng.below(specs.len())];
            h["__metadata__"]["kiln.spec"] = json!(s);
            (join(&h, &data), format!("spec {s:?}"))
        }
        10 => {
            h["__metadata__"] = json!(rng.below(100));
            (join(&h, &data), "metadata not a map".into())
        }
        _ => {
            // Weights replaced by non-finite or extreme values: a valid file.
            let mut b = base.to_vec();
            let start = b.len() - data.len();
            let at = start + 4 * rng.below(data.len() / 4);
            let v = [f32::NAN, f32::INFINITY, -0.0, f32::MAX, 1e-45][rng.below(5)];
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            (b, format!("value {v} at byte {at}"))
        }
    }
}

fn state_of(m: &Sequential, opt: &Adam) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = m
        .state_dict()
        .into_iter()
        .map(|(n, t, _)| (n, t.to_vec().unwrap()))
        .collect();
    out.extend(
        opt.state()
            .into_iter()
            .map(|(n, t)| (format!("optimizer.{n}"), t.to_vec().unwrap())),
    );
    out
}

/// Equal values: NaN matches NaN, and a denormal may come back flushed to zero (GPUs flush
/// them), as may the sign of zero.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    let tiny = |v: f32| v.abs() < f32::MIN_POSITIVE;
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()) || (tiny(*x) && tiny(*y))
        })
}

#[test]
fn hostile_checkpoints_are_err_or_load_what_the_file_holds() {
    let (base, base_opt) = base_files();
    let target = model(7);
    let mut opt = Adam::new(target.parameters(), AdamOptions::default()).unwrap();
    let strict = kiln::checkpoint::LoadOptions::default();
    let load = |weights: &[u8], optimizer: &[u8], opt: &mut Adam| -> kiln::Result<()> {
        let stored = kiln::checkpoint::from_bytes(weights)?;
        let saved = kiln::checkpoint::optimizer_from_bytes(optimizer)?;
        kiln::checkpoint::load_stored(&stored, &target, Some((&saved, opt)), &strict).map(|_| ())
    };
    // The base files load, and give the values the reference reader finds.
    load(&base, &base_opt, &mut opt).unwrap();
    let mut rng = Rng::new(13);
    let (mut cases, mut loaded) = (0usize, 0usize);
    let mut failures = Vec::new();
    while cases < 2000 {
        // Even cases mutate the weights file, odd ones the optimizer file.
        let of_optimizer = cases % 2 == 1;
        let (bytes, what) = mutate(if of_optimizer { &base_opt } else { &base }, &mut rng);
        let (weights, optimizer) = if of_optimizer {
            (base.clone(), bytes)
        } else {
            (bytes, base_opt.clone())
        };
        let what = format!(
            "{} file: {what}",
            if of_optimizer { "optimizer" } else { "weights" }
        );
        cases += 1;
        let before = state_of(&target, &opt);
        let (steps, lr) = (opt.steps(), opt.lr());
        let result = catch_unwind(AssertUnwindSafe(|| load(&weights, &optimizer, &mut opt)));
        let after = state_of(&target, &opt);
        match result {
            Err(_) => failures.push(format!("panic: {what}")),
            Ok(Err(_)) => {
                let untouched = before
                    .iter()
                    .zip(&after)
                    .all(|((_, a), (_, b))| same_bits(a, b));
                if !untouched || (steps, lr) != (opt.steps(), opt.lr()) {
                    failures.push(format!("Err but the model changed: {what}"));
                }
            }
            Ok(Ok(())) => {
                loaded += 1;
                let (Some(mut want), Some(want_opt)) = (reference(&weights), reference(&optimizer))
                else {
                    failures.push(format!("loaded a file the format forbids: {what}"));
                    continue;
                };
                want.extend(
                    want_opt
                        .into_iter()
                        .map(|(k, v)| (format!("optimizer.{k}"), v)),
                );
                for (name, got) in &after {
                    match want.get(name) {
                        Some((_, v)) if same_bits(v, got) => {}
                        // Optimizer state the file does not hold stays as it was.
                        None if name.starts_with("optimizer.") => {}
                        w => failures.push(format!(
                            "{what}: {name} differs from the file: {:?} vs {got:?}",
                            w.map(|x| &x.1)
                        )),
                    }
                }
            }
        }
    }
    eprintln!(
        "{cases} checkpoint files, {loaded} loaded, {} failures",
        failures.len()
    );
    assert!(
        loaded > 0 && loaded < cases / 2,
        "{loaded} of {cases} loaded"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
