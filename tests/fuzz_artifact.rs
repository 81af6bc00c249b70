//! Fuzz of the frozen-model file: a few hundred corrupt or hostile variants of real artifacts
//! (truncations, byte flips, unknown ops, wrong arity, cycles, forward references, zero,
//! negative and huge sizes, zero strides and groups, huge dilations, bad versions and element
//! types) are loaded and, when they load, run. None may panic; loading checks the whole graph
//! before any GPU work, so most are an `Err` from `load`.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use kiln::infer::{freeze, freeze_fn, InferenceModel};
use kiln::nn::{Init, Sequential};
use kiln::{Conv2dOptions, ConvTranspose2dOptions, Device, Pool2dOptions, Tensor};
use serde_json::{json, Value};

/// A frozen model as bytes, with inputs that it accepts.
struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    inputs: Vec<Tensor>,
}

fn bases(d: &Device) -> Vec<Base> {
    let mut out = Vec::new();
    // Convolutions, batch norm (folded), pooling, linear with fused activations.
    let spec = "conv2d(1,4,3,p=1) batchnorm2d(4) relu maxpool2d(2) flatten linear(16,5) tanh";
    let cnn = Sequential::from_spec(&mut Init::new(d, 1), spec).unwrap();
    let x = Tensor::randn(&[2, 1, 4, 4], 2, d).unwrap();
    let frozen = freeze(cnn, &x).unwrap();
    out.push(Base {
        name: "cnn",
        bytes: frozen.to_bytes().unwrap(),
        inputs: vec![x],
    });

    // Attention-like: layer norm, matmul, softmax, permutes, where, reductions.
    let wq = Tensor::randn(&[6, 6], 3, d).unwrap();
    let g = Tensor::randn(&[6], 4, d).unwrap();
    let x = Tensor::randn(&[2, 3, 6], 5, d).unwrap();
    let mask =
        Tensor::from_slice(&[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0], &[3, 3], d).unwrap();
    let frozen = freeze_fn(&[x.clone(), mask.clone()], &[Some(0), None], |t| {
        let h = t[0].layer_norm(&[6], Some(&g), None, 1e-5)?;
        let q = h.matmul(&wq)?;
        let s = q.matmul(&h.permute(&[0, 2, 1])?)?.mul_scalar(0.4)?;
        let s = t[1].where_cond(&s, &Tensor::full(&[3, 3], -1e9, t[1].device())?)?;
        let a = s.softmax(-1)?.matmul(&h)?;
        Ok(vec![a.add(&t[0])?, a.mean(&[1], false)?])
    })
    .unwrap();
    out.push(Base {
        name: "attention",
        bytes: frozen.to_bytes().unwrap(),
        inputs: vec![x, mask],
    });

    // Transposed and grouped convolutions, concat, narrow, index select, average pooling.
    let w1 = Tensor::randn(&[4, 1, 3, 3], 6, d).unwrap();
    let w2 = Tensor::randn(&[4, 2, 2, 2], 7, d).unwrap();
    let idx = Tensor::from_slice(&[2.0, 0.0, 1.0], &[3], d).unwrap();
    let x = Tensor::randn(&[2, 4, 3, 3], 8, d).unwrap();
    let frozen = freeze_fn(std::slice::from_ref(&x), &[Some(0)], |t| {
        let opts = Conv2dOptions {
            padding: [1, 1],
            groups: 4,
            ..Default::default()
        };
        let a = t[0].conv2d(&w1, None, &opts)?.gelu()?;
        let topts = ConvTranspose2dOptions {
            stride: [2, 2],
            ..Default::default()
        };
        let b = t[0].conv_transpose2d(&w2, None, &topts)?;
        let b = b.avg_pool2d(&Pool2dOptions::new([2, 2]))?;
        let c = Tensor::concat(&[&a, &b.narrow(1, 0, 2)?], 1)?;
        Ok(vec![c.index_select(1, &idx)?.sigmoid()?])
    })
    .unwrap();
    out.push(Base {
        name: "transposed",
        bytes: frozen.to_bytes().unwrap(),
        inputs: vec![x],
    });

    // Int8: quantized convolutions (patch rows for the first, the window over quantized
    // pixels for the second) and linear (rows), integer products.
    let spec = "conv2d(1,16,3,p=1) relu conv2d(16,4,3,p=1) relu flatten linear(64,5)";
    let cnn = Sequential::from_spec(&mut Init::new(d, 3), spec).unwrap();
    let x = Tensor::randn(&[2, 1, 4, 4], 9, d).unwrap();
    let frozen = freeze(cnn, &x).unwrap();
    let int8 = frozen
        .quantize(&kiln::infer::QuantizeOptions {
            calibration: vec![Tensor::randn(&[8, 1, 4, 4], 10, d).unwrap()],
            observer: kiln::infer::Observer::MinMax,
        })
        .unwrap();
    out.push(Base {
        name: "int8",
        bytes: int8.to_bytes().unwrap(),
        inputs: vec![x],
    });
    out
}

/// A change to a safetensors header.
type HeaderEdit = fn(&mut Value);

/// Splits a safetensors file into its JSON header and its data.
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn graph_of(header: &Value) -> Value {
    serde_json::from_str(header["__metadata__"]["kiln.graph"].as_str().unwrap()).unwrap()
}

fn with_graph(header: &Value, data: &[u8], graph: &Value) -> Vec<u8> {
    let mut h = header.clone();
    h["__metadata__"]["kiln.graph"] = Value::String(graph.to_string());
    join(&h, data)
}

/// Values that break sizes, indices and attributes.
fn hostile(rng: &mut Rng) -> Value {
    let pool = [
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(7),
        json!(u32::MAX),
        json!(1u64 << 31),
        json!(1u64 << 40),
        json!(1u64 << 63),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e30),
        json!(-0.5),
        json!(f32::MAX),
        json!("x"),
        json!(null),
        json!(true),
        json!([]),
        json!([0, 0]),
        json!([1u64 << 62, 0]),
        json!([-3, 1]),
        json!([0, 1u64 << 40]),
        json!({}),
    ];
    pool[rng.below(pool.len())].clone()
}

/// Every path to a leaf (or array) inside `v`.
fn paths(v: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                at.push(json!(k));
                paths(c, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                at.push(json!(i));
                paths(c, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn at_mut<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match k {
        Value::String(s) => &mut v[s.as_str()],
        Value::Number(n) => &mut v[n.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

/// One structural mutation of the graph JSON, aimed at what the loader must refuse.
fn mutate_graph(g: &mut Value, rng: &mut Rng) -> String {
    let nodes = g["nodes"].as_array().unwrap().len();
    let i = rng.below(nodes);
    let node = &mut g["nodes"][i];
    match rng.below(12) {
        0 => {
            node["op"]["op"] = json!("frobnicate");
            format!("unknown op at node {i}")
        }
        1 => {
            node["inputs"].as_array_mut().unwrap().pop();
            format!("one operand fewer at node {i}")
        }
        2 => {
            node["inputs"]
                .as_array_mut()
                .unwrap()
                .push(json!(["input", 0]));
            format!("one operand more at node {i}")
        }
        3 => {
            // A cycle or forward reference: the node reads itself or a later node.
            let j = i + rng.below(nodes - i);
            if let Some(first) = node["inputs"].as_array_mut().unwrap().first_mut() {
                *first = json!(["node", j]);
            }
            format!("node {i} reads node {j}")
        }
        4 => {
            if let Some(first) = node["inputs"].as_array_mut().unwrap().first_mut() {
                let kind = ["const", "input", "node", "weights"][rng.below(4)];
                *first = json!([kind, rng.below(1 << 20)]);
            }
            format!("operand out of range at node {i}")
        }
        5 => {
            let keys: Vec<String> = node["op"].as_object().unwrap().keys().cloned().collect();
            let k = &keys[rng.below(keys.len())];
            node["op"].as_object_mut().unwrap().remove(k);
            format!("attribute {k} missing at node {i}")
        }
        6 => {
            for k in [
                "stride", "groups", "dilation", "kernel", "padding", "axis", "size",
            ] {
                if node["op"].get(k).is_some() {
                    let v = [
                        json!([0, 1]),
                        json!(0),
                        json!([1u64 << 63, 1]),
                        json!([1, u32::MAX]),
                        json!(-1),
                    ];
                    node["op"][k] = v[rng.below(v.len())].clone();
                    return format!("{k} broken at node {i}");
                }
            }
            node["dtype"] = json!("f16");
            format!("f16 at node {i}")
        }
        7 => {
            node["shape"] = json!([[0, 0], [1u64 << 40, 3]]);
            format!("bad recorded shape at node {i}")
        }
        8 => {
            g["version"] = json!(rng.below(5) + 3);
            "future version".into()
        }
        9 => {
            let c = g["consts"].as_array().unwrap().len();
            if c > 0 {
                let k = rng.below(c);
                g["consts"][k]["shape"] = json!([rng.below(9), 1u64 << 33]);
            }
            "const shape differs from its tensor".into()
        }
        10 => {
            let outs = [
                json!([]),
                json!([["node", nodes + 3]]),
                json!([["input", 9]]),
                json!("all"),
            ];
            g["outputs"] = outs[rng.below(outs.len())].clone();
            "bad outputs".into()
        }
        _ => {
            g["inputs"][0]["shape"] = json!([[1, 0], [0, 0], [-5, 2]]);
            "bad input shape".into()
        }
    }
}

/// What an unmutated file gives: its canonical bytes and its outputs on the base inputs.
struct Reference {
    canonical: Vec<u8>,
    outputs: Vec<(Vec<usize>, Vec<f32>)>,
}

fn outputs(model: &InferenceModel, inputs: &[Tensor]) -> kiln::Result<Vec<(Vec<usize>, Vec<f32>)>> {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    model
        .run(&refs)?
        .iter()
        .map(|t| Ok((t.dims().to_vec(), t.to_vec()?)))
        .collect()
}

/// Loads and, if that works, runs; returns whether it loaded. A model that loads must run to
/// outputs of the base's shapes or to an `Err`, and a file that loads to the base model (the
/// same canonical bytes) must give the base's outputs bit for bit. Panics become failures
/// naming the case.
fn exercise(
    case: &str,
    bytes: &[u8],
    base: &Base,
    want: &Reference,
    d: &Device,
    failures: &mut Vec<String>,
) -> bool {
    let loaded = catch_unwind(AssertUnwindSafe(|| InferenceModel::from_bytes(bytes, d)));
    match loaded {
        Err(_) => {
            failures.push(format!("load panicked: {case}"));
            false
        }
        Ok(Err(e)) => {
            if e.to_string().is_empty() {
                failures.push(format!("empty error: {case}"));
            }
            false
        }
        Ok(Ok(model)) => {
            match catch_unwind(AssertUnwindSafe(|| outputs(&model, &base.inputs))) {
                Err(_) => failures.push(format!("run panicked: {case}")),
                Ok(Err(_)) => {}
                Ok(Ok(got)) => {
                    let shapes = |o: &[(Vec<usize>, Vec<f32>)]| {
                        o.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>()
                    };
                    // A file whose outputs name other nodes is a valid model of other shapes.
                    let outputs_moved = case.contains("String(\"outputs\")");
                    if shapes(&got) != shapes(&want.outputs) && !outputs_moved {
                        failures.push(format!(
                            "{case}: outputs {:?}, the base gives {:?}",
                            shapes(&got),
                            shapes(&want.outputs)
                        ));
                    }
                    let same_model = model.to_bytes().is_ok_and(|b| b == want.canonical);
                    if same_model && got != want.outputs {
                        failures.push(format!(
                            "{case}: loads as the base model but gives other values"
                        ));
                    }
                }
            }
            true
        }
    }
}

#[test]
fn hostile_artifacts_are_err_never_panics() {
    // A device of its own: a mutated index may set the device's fault word, which would fail
    // a readback of a test running beside this one.
    let d = own_device();
    let mut rng = Rng::new(12);
    let mut failures = Vec::new();
    let (mut cases, mut loaded) = (0usize, 0usize);
    for base in bases(&d) {
        let (header, data) = split(&base.bytes);
        let graph = graph_of(&header);
        let model = InferenceModel::from_bytes(&base.bytes, &d).expect("the base file loads");
        let want = Reference {
            canonical: model.to_bytes().unwrap(),
            outputs: outputs(&model, &base.inputs).unwrap(),
        };

        // Truncations, including inside the length prefix and the header.
        for k in 0..40 {
            let cut = if k < 10 {
                k
            } else {
                rng.below(base.bytes.len())
            };
            let case = format!("{}: truncated to {cut} bytes", base.name);
            loaded += exercise(&case, &base.bytes[..cut], &base, &want, &d, &mut failures) as usize;
            cases += 1;
        }
        // Random byte flips anywhere (header, metadata JSON, weights).
        for _ in 0..60 {
            let mut b = base.bytes.clone();
            let flips = 1 + rng.below(4);
            for _ in 0..flips {
                let at = if rng.below(2) == 0 {
                    rng.below(b.len())
                } else {
                    rng.below(b.len().min(400))
                };
                b[at] ^= 1 << rng.below(8);
            }
            let case = format!("{}: {flips} byte flips", base.name);
            loaded += exercise(&case, &b, &base, &want, &d, &mut failures) as usize;
            cases += 1;
        }
        // Structural mutations of the graph.
        for _ in 0..60 {
            let mut g = graph.clone();
            let what = mutate_graph(&mut g, &mut rng);
            let case = format!("{}: {what}", base.name);
            loaded += exercise(
                &case,
                &with_graph(&header, &data, &g),
                &base,
                &want,
                &d,
                &mut failures,
            ) as usize;
            cases += 1;
        }
        // Any value in the graph replaced by a hostile one.
        let mut all = Vec::new();
        paths(&graph, &mut Vec::new(), &mut all);
        for _ in 0..60 {
            let mut g = graph.clone();
            let p = &all[1 + rng.below(all.len() - 1)];
            let v = hostile(&mut rng);
            *at_mut(&mut g, p) = v.clone();
            let case = format!("{}: {p:?} = {v}", base.name);
            loaded += exercise(
                &case,
                &with_graph(&header, &data, &g),
                &base,
                &want,
                &d,
                &mut failures,
            ) as usize;
            cases += 1;
        }
        // The safetensors header itself: metadata removed or retyped, tensor entries lying.
        let edits: [(&str, HeaderEdit); 4] = [
            ("no graph", |h| {
                h["__metadata__"]
                    .as_object_mut()
                    .unwrap()
                    .remove("kiln.graph");
            }),
            ("other format", |h| {
                h["__metadata__"]["kiln.format"] = json!("kiln.checkpoint")
            }),
            ("const of another type", |h| h["c0"]["dtype"] = json!("I64")),
            ("const missing", |h| {
                h.as_object_mut().unwrap().remove("c0");
            }),
        ];
        for (what, edit) in edits {
            let mut h = header.clone();
            edit(&mut h);
            let case = format!("{}: {what}", base.name);
            loaded += exercise(&case, &join(&h, &data), &base, &want, &d, &mut failures) as usize;
            cases += 1;
        }
    }
    eprintln!(
        "{cases} hostile artifacts, {loaded} loaded and ran, {} failures",
        failures.len()
    );
    assert!(cases >= 500, "{cases} cases");
    // Byte flips in the weights give files that load; not everything may.
    assert!(
        loaded < cases / 2,
        "{loaded} of {cases} loaded: the mutations do not reach the checks"
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_base_round_trips() {
    // The oracle for the fuzz: unmutated files load and give the capturing run's outputs.
    let d = dev();
    for base in bases(&d) {
        let a = InferenceModel::from_bytes(&base.bytes, &d).unwrap();
        // A model is written to the same bytes every time (sorted header keys).
        assert!(
            a.to_bytes().unwrap() == base.bytes,
            "{}: saving again gives other bytes",
            base.name
        );
        let b = InferenceModel::from_bytes(&a.to_bytes().unwrap(), &own_device()).unwrap();
        let refs: Vec<&Tensor> = base.inputs.iter().collect();
        let x = a.run(&refs).unwrap();
        let moved: Vec<Tensor> = base
            .inputs
            .iter()
            .map(|t| Tensor::from_slice(&t.to_vec().unwrap(), t.dims(), b.device()).unwrap())
            .collect();
        let y = b.run(&moved.iter().collect::<Vec<_>>()).unwrap();
        for (p, q) in x.iter().zip(&y) {
            assert_eq!(p.to_vec().unwrap(), q.to_vec().unwrap(), "{}", base.name);
        }
    }
}

#[test]
fn element_type_confusions_are_err() {
    let d = dev();
    let base = bases(&d).remove(0);
    let f32_model = InferenceModel::from_bytes(&base.bytes, &d).unwrap();
    // Without SHADER_F16 the conversion's documented Err is asserted, and there is no f16 file
    // to confuse.
    let Some(half) = to_half_or_refused(f32_model) else {
        return;
    };
    let bytes = half.to_bytes().unwrap();
    let (header, data) = split(&bytes);
    let graph = graph_of(&header);
    let nodes = graph["nodes"].as_array().unwrap();
    let cast = nodes
        .iter()
        .position(|n| n["op"]["op"] == "cast")
        .expect("a cast node");
    // A cast to the type its operand already has.
    let mut g = graph.clone();
    let from = if g["nodes"][cast]["dtype"] == "f16" {
        "f32"
    } else {
        "f16"
    };
    g["nodes"][cast]["dtype"] = json!(from);
    g["nodes"][cast]["op"]["to"] = json!(from);
    let e = InferenceModel::from_bytes(&with_graph(&header, &data, &g), &d)
        .err()
        .expect("cast to the same type");
    assert!(e.to_string().contains("casts"), "{e}");
    // An f16 constant as an output.
    let k = graph["consts"]
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c["dtype"] == "f16")
        .expect("an f16 constant");
    let mut g = graph.clone();
    g["outputs"] = json!([["const", k]]);
    let e = InferenceModel::from_bytes(&with_graph(&header, &data, &g), &d)
        .err()
        .expect("f16 output");
    assert!(e.to_string().contains("must be f32"), "{e}");
}
