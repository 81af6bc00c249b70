//! The deployable file: a safetensors file whose tensors are the graph's constants (`c0`,
//! `c1`, ...) and whose metadata holds the graph as JSON under `kiln.graph`. Loading checks
//! the whole graph on the CPU (version, ops, arity, attributes, acyclicity, shapes and
//! sizes) before any GPU work.

use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};

use super::graph::{DType, Dim, Graph, InputSpec, Node, OpKind, Src};
use super::InferenceModel;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::elementwise::{BinaryOp, UnaryOp};
use crate::ops::reduce::ReduceOp;
use crate::tensor::Tensor;
use crate::{Conv2dOptions, ConvTranspose2dOptions, Pool2dOptions};

const FORMAT_KEY: &str = "kiln.format";
const GRAPH_KEY: &str = "kiln.graph";
const FORMAT: &str = "kiln.graph";
/// The artifact version this build writes. Version 1 files read too, unless they hold int8
/// ops, whose word layout version 2 changed.
pub(crate) const VERSION: u64 = 2;
const LOAD: &str = "InferenceModel::load";

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid(LOAD, msg)
}

const UNARY: [UnaryOp; 21] = [
    UnaryOp::Identity,
    UnaryOp::Neg,
    UnaryOp::Abs,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Relu,
    UnaryOp::LeakyRelu,
    UnaryOp::Sigmoid,
    UnaryOp::Tanh,
    UnaryOp::Gelu,
    UnaryOp::Silu,
    UnaryOp::Clamp,
    UnaryOp::Log1p,
    UnaryOp::Softplus,
    UnaryOp::Sin,
    UnaryOp::Cos,
    UnaryOp::GeluTanh,
    UnaryOp::Erf,
    UnaryOp::Trunc,
];

const BINARY: [BinaryOp; 13] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Pow,
    BinaryOp::Maximum,
    BinaryOp::Minimum,
    BinaryOp::Eq,
    BinaryOp::Ne,
    BinaryOp::Lt,
    BinaryOp::Le,
    BinaryOp::Gt,
    BinaryOp::Ge,
];

const REDUCE: [ReduceOp; 7] = [
    ReduceOp::Sum,
    ReduceOp::Mean,
    ReduceOp::Max,
    ReduceOp::Min,
    ReduceOp::ArgMax,
    ReduceOp::ArgMin,
    ReduceOp::Var,
];

fn src_json(s: Src) -> Value {
    match s {
        Src::Input(k) => json!(["input", k]),
        Src::Const(k) => json!(["const", k]),
        Src::Node(k) => json!(["node", k]),
    }
}

fn dims_json(d: &[Dim]) -> Value {
    Value::Array(d.iter().map(|d| json!([d.per_batch, d.fixed])).collect())
}

/// A float attribute: a JSON number, or "inf", "-inf" or "nan" (which JSON numbers cannot
/// hold; a clamp to infinity or a mask filled with -inf needs them).
fn num(v: f32) -> Value {
    if v.is_finite() {
        json!(v)
    } else if v.is_nan() {
        json!("nan")
    } else if v > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

fn act_json(a: &super::graph::Act) -> Value {
    match a {
        Some((op, alpha)) => json!([*op as u32, num(*alpha)]),
        None => Value::Null,
    }
}

fn op_json(op: &OpKind) -> Value {
    let mut v = match op {
        OpKind::Reshape { shape } | OpKind::Expand { shape } => {
            json!({ "shape": dims_json(shape) })
        }
        OpKind::Permute { perm } => json!({ "perm": perm }),
        OpKind::Narrow { axis, start, len } => {
            json!({ "axis": axis, "start": dims_json(&[*start]), "len": dims_json(&[*len]) })
        }
        OpKind::Unary { op, alpha, beta } => {
            json!({ "code": *op as u32, "alpha": num(*alpha), "beta": num(*beta) })
        }
        OpKind::Binary { op } => json!({ "code": *op as u32 }),
        OpKind::BinaryScalar { op, scalar, left } => {
            json!({ "code": *op as u32, "scalar": num(*scalar), "left": left })
        }
        OpKind::Where | OpKind::Matmul => json!({}),
        OpKind::Reduce {
            op,
            axes,
            keepdim,
            correction,
        } => {
            json!({ "code": *op as u32, "axes": axes, "keepdim": keepdim, "correction": correction })
        }
        OpKind::Softmax { axis, log } => json!({ "axis": axis, "log": log }),
        OpKind::Linear { bias, act } => json!({ "bias": bias, "act": act_json(act) }),
        OpKind::Conv2d { opts, bias, act } => json!({
            "stride": opts.stride, "padding": opts.padding, "dilation": opts.dilation,
            "groups": opts.groups, "bias": bias, "act": act_json(act)
        }),
        OpKind::ConvTranspose2d { opts, bias } => json!({
            "stride": opts.stride, "padding": opts.padding, "dilation": opts.dilation,
            "output_padding": opts.output_padding, "groups": opts.groups, "bias": bias
        }),
        OpKind::Pool { opts, max } => json!({
            "kernel": opts.kernel, "stride": opts.stride, "padding": opts.padding,
            "dilation": opts.dilation, "count_include_pad": opts.count_include_pad, "max": max
        }),
        OpKind::AdaptiveAvgPool { size } => json!({ "size": size }),
        OpKind::BatchNorm { eps, weight, bias } => {
            json!({ "eps": num(*eps), "weight": weight, "bias": bias })
        }
        OpKind::LayerNorm {
            shape,
            eps,
            weight,
            bias,
        } => {
            json!({ "normalized_shape": shape, "eps": num(*eps), "weight": weight, "bias": bias })
        }
        OpKind::GroupNorm {
            groups,
            eps,
            weight,
            bias,
        } => {
            json!({ "groups": groups, "eps": num(*eps), "weight": weight, "bias": bias })
        }
        OpKind::Concat { axis } | OpKind::IndexSelect { axis } | OpKind::Gather { axis } => {
            json!({ "axis": axis })
        }
        OpKind::Full { shape, value } => json!({ "shape": dims_json(shape), "value": num(*value) }),
        OpKind::Cast { to } => json!({ "to": to.name() }),
        OpKind::QuantizeRows { scale, zero_point } => {
            json!({ "scale": num(*scale), "zero_point": zero_point })
        }
        OpKind::QuantizeIm2col {
            scale,
            zero_point,
            kernel,
            opts,
        } => json!({
            "scale": num(*scale), "zero_point": zero_point, "kernel": kernel,
            "stride": opts.stride, "padding": opts.padding, "dilation": opts.dilation
        }),
        OpKind::QuantizeNhwc { scale, zero_point } => {
            json!({ "scale": num(*scale), "zero_point": zero_point })
        }
        OpKind::QGemm {
            n,
            act,
            spatial,
            dynamic,
            window,
            int8_out,
        } => {
            let window = window.map(|w| {
                json!({ "kernel": w.kernel, "stride": w.stride, "padding": w.padding,
                        "dilation": w.dilation, "grid": w.grid, "zero_point": w.zero_point })
            });
            json!({ "n": n, "act": act_json(act), "spatial": spatial, "dynamic": dynamic,
                    "window": window, "int8_out": int8_out })
        }
        OpKind::QuantizeDynamic => json!({}),
    };
    v["op"] = json!(op.name());
    v
}

fn dtype_name(d: DType) -> &'static str {
    d.name()
}

/// The graph's JSON.
fn graph_json(g: &Graph) -> Value {
    json!({
        "version": VERSION,
        "inputs": g.inputs.iter().map(|i| json!({ "shape": dims_json(&i.shape) })).collect::<Vec<_>>(),
        "consts": g.consts.iter().zip(&g.const_dtypes).map(|(t, d)| json!({ "shape": t.dims(), "dtype": dtype_name(*d) })).collect::<Vec<_>>(),
        "nodes": g.nodes.iter().map(|n| json!({
            "op": op_json(&n.op),
            "inputs": n.inputs.iter().map(|&s| src_json(s)).collect::<Vec<_>>(),
            "shape": dims_json(&n.shape),
            "dtype": dtype_name(n.dtype),
        })).collect::<Vec<_>>(),
        "outputs": g.outputs.iter().map(|&s| src_json(s)).collect::<Vec<_>>(),
    })
}

/// The same safetensors file with its header's keys in sorted order, so that a model is always
/// written to the same bytes (the metadata map has no fixed order of its own).
fn sorted_header(bytes: &[u8]) -> Option<Vec<u8>> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: Value = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    // serde_json's objects are ordered maps: serialising sorts the keys.
    let mut h = serde_json::to_vec(&header).ok()?;
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    Some(out)
}

impl InferenceModel {
    /// Writes the model as one file: weights as safetensors tensors, the graph as metadata.
    ///
    /// ```
    /// # use kiln::nn::{Init, Sequential};
    /// # let dev = kiln::Device::default_device()?;
    /// let net = Sequential::from_spec(&mut Init::new(&dev, 0), "linear(3,4) relu linear(4,2)")?;
    /// let x = kiln::Tensor::randn(&[2, 3], 1, &dev)?;
    /// let frozen = kiln::infer::freeze(net, &x)?;
    /// let path = std::env::temp_dir().join("kiln-doc-frozen.safetensors");
    /// frozen.save(&path)?;
    /// let loaded = kiln::infer::InferenceModel::load(&path, &dev)?;
    /// assert_eq!(loaded.predict(&x)?.to_vec()?, frozen.predict(&x)?.to_vec()?);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        // Through a synced `.partial` file: an error midway leaves an old file whole.
        crate::checkpoint::write_atomic("InferenceModel::save", path, &bytes)
    }

    /// The bytes [`InferenceModel::save`] writes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        const OP: &str = "InferenceModel::save";
        let g = &self.graph;
        let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (k, (t, d)) in g.consts.iter().zip(&g.const_dtypes).enumerate() {
            let (dtype, bytes) = match d {
                DType::F32 => (Dtype::F32, bytemuck::cast_slice(&t.to_vec()?).to_vec()),
                DType::F16 => {
                    let mut b = t.read_words(t.numel().div_ceil(2))?;
                    b.truncate(t.numel() * 2);
                    (Dtype::F16, b)
                }
                DType::I32 => (Dtype::I32, t.read_words(t.numel())?),
            };
            data.push((format!("c{k}"), dtype, t.shape(), bytes));
        }
        let views = data
            .iter()
            .map(|(n, dt, s, b)| {
                TensorView::new(*dt, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::invalid(OP, format!("{n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = [
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (GRAPH_KEY.to_string(), graph_json(g).to_string()),
        ]
        .into_iter()
        .collect();
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::invalid(OP, e.to_string()))?;
        sorted_header(&bytes).ok_or_else(|| Error::invalid(OP, "internal: unreadable header"))
    }

    /// A model from a file written by [`InferenceModel::save`], with no model code. A
    /// truncated, corrupt or hostile file is an `Err` naming what is wrong, found before
    /// any GPU work.
    pub fn load(path: &Path, device: &Device) -> Result<InferenceModel> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            op: LOAD,
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_bytes(&bytes, device)
    }

    /// [`InferenceModel::load`] from memory.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<InferenceModel> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "the file is not a frozen kiln model (no {FORMAT_KEY} = {FORMAT} in its metadata)"
            )));
        }
        let text = meta
            .get(GRAPH_KEY)
            .ok_or_else(|| bad(format!("the file has no {GRAPH_KEY}")))?;
        let v: Value = serde_json::from_str(text)
            .map_err(|e| bad(format!("the graph is not valid JSON: {e}")))?;
        let parsed = parse_graph(&v)?;
        // Constants: shapes and types from the graph must match the tensors in the file.
        let mut host = Vec::with_capacity(parsed.consts.len());
        for (k, (shape, dtype)) in parsed.consts.iter().enumerate() {
            let name = format!("c{k}");
            let view = st
                .tensor(&name)
                .map_err(|_| bad(format!("constant {name} is missing from the file")))?;
            if view.shape() != &shape[..] {
                return Err(bad(format!(
                    "constant {name} has shape {:?}, the graph says {shape:?}",
                    view.shape()
                )));
            }
            let want = match dtype {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                DType::I32 => Dtype::I32,
            };
            if view.dtype() != want {
                return Err(bad(format!(
                    "constant {name} is {:?}, the graph says {}",
                    view.dtype(),
                    dtype.name()
                )));
            }
            crate::shape::checked_numel(shape)
                .filter(|&n| n as u64 * 4 <= device.max_binding_bytes())
                .ok_or_else(|| bad(format!("constant {name} of shape {shape:?} is too large")))?;
            host.push(view.data().to_vec());
        }
        let names: std::collections::HashSet<String> =
            (0..parsed.consts.len()).map(|k| format!("c{k}")).collect();
        if let Some(extra) = st.names().into_iter().find(|n| !names.contains(*n)) {
            return Err(bad(format!(
                "tensor {extra} in the file is not in the graph"
            )));
        }
        // The graph, checked with placeholder constants of the right shapes: no GPU data yet.
        let mut graph = Graph {
            inputs: parsed.inputs,
            consts: Vec::new(),
            const_dtypes: parsed.consts.iter().map(|c| c.1).collect(),
            nodes: parsed.nodes,
            outputs: parsed.outputs,
        };
        check_graph(&graph, &parsed.consts)?;
        for ((shape, dtype), data) in parsed.consts.iter().zip(&host) {
            graph.consts.push(match dtype {
                DType::F32 => Tensor::from_slice(
                    bytemuck::pod_collect_to_vec::<u8, f32>(data).as_slice(),
                    shape,
                    device,
                )?,
                DType::F16 => {
                    let bits: Vec<u16> = data
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    super::half_from_bits(&bits, shape, device)?
                }
                DType::I32 => Tensor::from_slice_i32(
                    bytemuck::pod_collect_to_vec::<u8, i32>(data).as_slice(),
                    shape,
                    device,
                )?,
            });
        }
        if graph.nodes.iter().any(|n| n.dtype == DType::F16)
            && !device.features().contains(wgpu::Features::SHADER_F16)
        {
            return Err(bad(format!(
                "the model is f16 and {} has no SHADER_F16 feature",
                device.name()
            )));
        }
        device.synchronize()?;
        Ok(InferenceModel::from_graph(device.clone(), graph))
    }
}

/// Structure, attributes, and shapes at batch sizes 1 and 2, against constants of `consts`
/// shapes.
fn check_graph(g: &Graph, consts: &[(Vec<usize>, DType)]) -> Result<()> {
    let fake = FakeConsts(consts);
    fake.check_structure(g)?;
    for n in [1usize, 2] {
        let inputs = g
            .inputs
            .iter()
            .map(|i| i.shape.iter().map(|d| d.at(n)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()
            .map_err(|e| bad(format!("input shapes: {e}")))?;
        fake.infer_shapes(g, &inputs, n)
            .map_err(|e| bad(e.to_string()))?;
    }
    // Element types: f16 only where a half kernel exists, and casts where types change.
    for (i, node) in g.nodes.iter().enumerate() {
        let is_cast = matches!(node.op, OpKind::Cast { .. });
        if node.dtype == DType::F16 && !node.op.has_half_kernel() {
            return Err(bad(format!(
                "node {i} ({}) is f16 but has no half-precision kernel",
                node.op.name()
            )));
        }
        for s in &node.inputs {
            let d = match *s {
                Src::Input(_) => DType::F32,
                Src::Const(k) => consts[k].1,
                Src::Node(k) => g.nodes[k].dtype,
            };
            if is_cast && d == node.dtype {
                return Err(bad(format!(
                    "node {i} casts an {} operand to {}",
                    d.name(),
                    node.dtype.name()
                )));
            }
            let want = node.op.operand_dtype(node.dtype);
            if !is_cast && d != want {
                return Err(bad(format!(
                    "node {i} ({}) is {} but reads an {} operand",
                    node.op.name(),
                    node.dtype.name(),
                    d.name()
                )));
            }
        }
        // Int8 words come only from int8 constants and the quantizing ops, never from a
        // view that could stretch a small buffer.
        if node.op.operand_dtype(node.dtype) == DType::I32 {
            for s in &node.inputs {
                let ok = match *s {
                    Src::Const(k) => consts[k].1 == DType::I32,
                    Src::Node(k) => g.nodes[k].op.output_dtype() == Some(DType::I32),
                    Src::Input(_) => false,
                };
                if !ok {
                    return Err(bad(format!(
                        "node {i} ({}) reads int8 words from {s:?}, which is not an int8 \
                         constant or a quantizing node",
                        node.op.name()
                    )));
                }
            }
        }
        if let Some(out) = node.op.output_dtype() {
            if node.dtype != out {
                return Err(bad(format!(
                    "node {i} ({}) gives {}, not {}",
                    node.op.name(),
                    out.name(),
                    node.dtype.name()
                )));
            }
        }
        if let OpKind::Cast { to } = node.op {
            if to != node.dtype {
                return Err(bad(format!(
                    "node {i} casts to {} but is {}",
                    to.name(),
                    node.dtype.name()
                )));
            }
        }
    }
    for s in &g.outputs {
        let d = match *s {
            Src::Input(_) => DType::F32,
            Src::Const(k) => consts[k].1,
            Src::Node(k) => g.nodes[k].dtype,
        };
        if d != DType::F32 {
            return Err(bad(format!(
                "output {s:?} is {}, outputs must be f32",
                d.name()
            )));
        }
    }
    Ok(())
}

/// Structural and shape checks of a graph whose constants are not uploaded yet.
struct FakeConsts<'a>(&'a [(Vec<usize>, DType)]);

impl FakeConsts<'_> {
    fn check_structure(&self, g: &Graph) -> Result<()> {
        let ok = |src: &Src, before: usize| match *src {
            Src::Input(k) => k < g.inputs.len(),
            Src::Const(k) => k < self.0.len(),
            Src::Node(k) => k < before,
        };
        for (i, node) in g.nodes.iter().enumerate() {
            if let Some(src) = node.inputs.iter().find(|s| !ok(s, i)) {
                return Err(bad(format!(
                    "node {i} ({}) reads {src:?}, which is missing or not computed before it (a cycle or a dangling edge)",
                    node.op.name()
                )));
            }
            if let Some(a) = node.op.arity() {
                if node.inputs.len() != a {
                    return Err(bad(format!(
                        "node {i} ({}) has {} operands, needs {a}",
                        node.op.name(),
                        node.inputs.len()
                    )));
                }
            } else if node.inputs.is_empty() {
                return Err(bad(format!("node {i} ({}) has no operand", node.op.name())));
            }
            node.op
                .check_attributes()
                .map_err(|e| bad(format!("node {i}: {e}")))?;
        }
        if g.outputs.is_empty() {
            return Err(bad("the graph has no output"));
        }
        if let Some(src) = g.outputs.iter().find(|s| !ok(s, g.nodes.len())) {
            return Err(bad(format!("output {src:?} does not exist")));
        }
        Ok(())
    }

    fn infer_shapes(&self, g: &Graph, inputs: &[Vec<usize>], n: usize) -> Result<()> {
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(g.nodes.len());
        for (i, node) in g.nodes.iter().enumerate() {
            let ins: Vec<&[usize]> = node
                .inputs
                .iter()
                .map(|&s| match s {
                    Src::Input(k) => &inputs[k][..],
                    Src::Const(k) => &self.0[k].0[..],
                    Src::Node(k) => &shapes[k][..],
                })
                .collect();
            let s = node
                .op
                .output_shape(&ins, n)
                .map_err(|e| bad(format!("node {i}: {e}")))?;
            let recorded =
                super::graph::dims_at(&node.shape, n).map_err(|e| bad(format!("node {i}: {e}")))?;
            if s != recorded {
                return Err(bad(format!(
                    "node {i} ({}) gives {s:?}, the graph says {recorded:?}",
                    node.op.name()
                )));
            }
            shapes.push(s);
        }
        Ok(())
    }
}

struct Parsed {
    inputs: Vec<InputSpec>,
    consts: Vec<(Vec<usize>, DType)>,
    nodes: Vec<Node>,
    outputs: Vec<Src>,
}

fn field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Value> {
    v.get(key)
        .ok_or_else(|| bad(format!("{what} has no {key}")))
}

fn arr<'a>(v: &'a Value, what: &str) -> Result<&'a Vec<Value>> {
    v.as_array()
        .ok_or_else(|| bad(format!("{what} must be a list")))
}

fn uint(v: &Value, what: &str) -> Result<usize> {
    v.as_u64()
        .filter(|&x| x <= super::graph::MAX_ATTR as u64)
        .map(|x| x as usize)
        .ok_or_else(|| {
            bad(format!(
                "{what} must be an integer in 0..={}, got {v}",
                super::graph::MAX_ATTR
            ))
        })
}

fn int(v: &Value, what: &str) -> Result<i64> {
    v.as_i64()
        .filter(|x| x.unsigned_abs() <= super::graph::MAX_ATTR as u64)
        .ok_or_else(|| {
            bad(format!(
                "{what} must be an integer of magnitude at most {}, got {v}",
                super::graph::MAX_ATTR
            ))
        })
}

fn float(v: &Value, what: &str) -> Result<f32> {
    match v.as_str() {
        Some("inf") => Ok(f32::INFINITY),
        Some("-inf") => Ok(f32::NEG_INFINITY),
        Some("nan") => Ok(f32::NAN),
        _ => v
            .as_f64()
            .map(|x| x as f32)
            .filter(|x| x.is_finite())
            .ok_or_else(|| {
                bad(format!(
                    "{what} must be a number in f32 range, \"inf\", \"-inf\" or \"nan\", got {v}"
                ))
            }),
    }
}

fn boolean(v: &Value, what: &str) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| bad(format!("{what} must be true or false, got {v}")))
}

fn uints(v: &Value, what: &str) -> Result<Vec<usize>> {
    let a = arr(v, what)?;
    if a.len() > crate::shape::MAX_RANK {
        return Err(bad(format!("{what} has {} entries", a.len())));
    }
    a.iter().map(|x| uint(x, what)).collect()
}

fn pair(v: &Value, what: &str) -> Result<[usize; 2]> {
    let u = uints(v, what)?;
    <[usize; 2]>::try_from(u).map_err(|_| bad(format!("{what} must hold two integers")))
}

fn dims(v: &Value, what: &str) -> Result<Vec<Dim>> {
    let a = arr(v, what)?;
    if a.len() > crate::shape::MAX_RANK {
        return Err(bad(format!("{what} has rank {}", a.len())));
    }
    a.iter()
        .map(|d| {
            let p = arr(d, what)?;
            if p.len() != 2 {
                return Err(bad(format!("{what}: a size is [per_batch, fixed]")));
            }
            Ok(Dim {
                per_batch: int(&p[0], what)?,
                fixed: int(&p[1], what)?,
            })
        })
        .collect()
}

fn src(v: &Value, what: &str) -> Result<Src> {
    let p = arr(v, what)?;
    if p.len() != 2 {
        return Err(bad(format!("{what}: an operand is [kind, index]")));
    }
    let k = uint(&p[1], what)?;
    match p[0].as_str() {
        Some("input") => Ok(Src::Input(k)),
        Some("const") => Ok(Src::Const(k)),
        Some("node") => Ok(Src::Node(k)),
        _ => Err(bad(format!("{what}: unknown operand kind {}", p[0]))),
    }
}

fn dtype(v: &Value, what: &str) -> Result<DType> {
    match v.as_str() {
        Some("f32") => Ok(DType::F32),
        Some("f16") => Ok(DType::F16),
        Some("i32") => Ok(DType::I32),
        _ => Err(bad(format!("{what}: unknown element type {v}"))),
    }
}

fn code<T: Copy>(table: &[T], v: &Value, what: &str) -> Result<T> {
    let c = uint(v, what)?;
    table
        .get(c)
        .copied()
        .ok_or_else(|| bad(format!("{what}: unknown op code {c}")))
}

fn act(v: &Value, what: &str) -> Result<super::graph::Act> {
    if v.is_null() {
        return Ok(None);
    }
    let p = arr(v, what)?;
    if p.len() != 2 {
        return Err(bad(format!("{what}: an activation is [code, alpha]")));
    }
    let op = code(&UNARY, &p[0], what)?;
    if !super::graph::fusable_activation(op) {
        return Err(bad(format!(
            "{what}: {op:?} cannot run in a kernel epilogue"
        )));
    }
    Ok(Some((op, float(&p[1], what)?)))
}

fn parse_op(v: &Value, what: &str) -> Result<OpKind> {
    let name = field(v, "op", what)?
        .as_str()
        .ok_or_else(|| bad(format!("{what}: op must be a name")))?;
    let f = |k: &str| field(v, k, what);
    Ok(match name {
        "reshape" => OpKind::Reshape {
            shape: dims(f("shape")?, what)?,
        },
        "expand" => OpKind::Expand {
            shape: dims(f("shape")?, what)?,
        },
        "permute" => OpKind::Permute {
            perm: uints(f("perm")?, what)?,
        },
        "narrow" => {
            let one = |k: &str| -> Result<Dim> {
                dims(f(k)?, what)?
                    .first()
                    .copied()
                    .ok_or_else(|| bad(format!("{what}: {k} is empty")))
            };
            OpKind::Narrow {
                axis: uint(f("axis")?, what)?,
                start: one("start")?,
                len: one("len")?,
            }
        }
        "unary" => OpKind::Unary {
            op: code(&UNARY, f("code")?, what)?,
            alpha: float(f("alpha")?, what)?,
            beta: float(f("beta")?, what)?,
        },
        "binary" => OpKind::Binary {
            op: code(&BINARY, f("code")?, what)?,
        },
        "binary_scalar" => OpKind::BinaryScalar {
            op: code(&BINARY, f("code")?, what)?,
            scalar: float(f("scalar")?, what)?,
            left: boolean(f("left")?, what)?,
        },
        "where" => OpKind::Where,
        "matmul" => OpKind::Matmul,
        "reduce" => OpKind::Reduce {
            op: code(&REDUCE, f("code")?, what)?,
            axes: arr(f("axes")?, what)?
                .iter()
                .map(|a| int(a, what).map(|x| x as isize))
                .collect::<Result<_>>()?,
            keepdim: boolean(f("keepdim")?, what)?,
            correction: float(f("correction")?, what)?,
        },
        "softmax" => OpKind::Softmax {
            axis: int(f("axis")?, what)? as isize,
            log: boolean(f("log")?, what)?,
        },
        "linear" => OpKind::Linear {
            bias: boolean(f("bias")?, what)?,
            act: act(f("act")?, what)?,
        },
        "conv2d" => OpKind::Conv2d {
            opts: Conv2dOptions {
                stride: pair(f("stride")?, what)?,
                padding: pair(f("padding")?, what)?,
                dilation: pair(f("dilation")?, what)?,
                groups: uint(f("groups")?, what)?,
            },
            bias: boolean(f("bias")?, what)?,
            act: act(f("act")?, what)?,
        },
        "conv_transpose2d" => OpKind::ConvTranspose2d {
            opts: ConvTranspose2dOptions {
                stride: pair(f("stride")?, what)?,
                padding: pair(f("padding")?, what)?,
                dilation: pair(f("dilation")?, what)?,
                output_padding: pair(f("output_padding")?, what)?,
                groups: uint(f("groups")?, what)?,
            },
            bias: boolean(f("bias")?, what)?,
        },
        "pool2d" => OpKind::Pool {
            opts: Pool2dOptions {
                kernel: pair(f("kernel")?, what)?,
                stride: pair(f("stride")?, what)?,
                padding: pair(f("padding")?, what)?,
                dilation: pair(f("dilation")?, what)?,
                count_include_pad: boolean(f("count_include_pad")?, what)?,
            },
            max: boolean(f("max")?, what)?,
        },
        "adaptive_avg_pool2d" => OpKind::AdaptiveAvgPool {
            size: pair(f("size")?, what)?,
        },
        "batch_norm" => OpKind::BatchNorm {
            eps: float(f("eps")?, what)?,
            weight: boolean(f("weight")?, what)?,
            bias: boolean(f("bias")?, what)?,
        },
        "layer_norm" => OpKind::LayerNorm {
            shape: uints(f("normalized_shape")?, what)?,
            eps: float(f("eps")?, what)?,
            weight: boolean(f("weight")?, what)?,
            bias: boolean(f("bias")?, what)?,
        },
        "group_norm" => OpKind::GroupNorm {
            groups: uint(f("groups")?, what)?,
            eps: float(f("eps")?, what)?,
            weight: boolean(f("weight")?, what)?,
            bias: boolean(f("bias")?, what)?,
        },
        "concat" => OpKind::Concat {
            axis: int(f("axis")?, what)? as isize,
        },
        "index_select" => OpKind::IndexSelect {
            axis: int(f("axis")?, what)? as isize,
        },
        "gather" => OpKind::Gather {
            axis: int(f("axis")?, what)? as isize,
        },
        "full" => OpKind::Full {
            shape: dims(f("shape")?, what)?,
            value: float(f("value")?, what)?,
        },
        "quantize_rows" => OpKind::QuantizeRows {
            scale: float(f("scale")?, what)?,
            zero_point: zero_point(f("zero_point")?, what)?,
        },
        "quantize_im2col" => OpKind::QuantizeIm2col {
            scale: float(f("scale")?, what)?,
            zero_point: zero_point(f("zero_point")?, what)?,
            kernel: pair(f("kernel")?, what)?,
            opts: Conv2dOptions {
                stride: pair(f("stride")?, what)?,
                padding: pair(f("padding")?, what)?,
                dilation: pair(f("dilation")?, what)?,
                groups: 1,
            },
        },
        "qgemm" => OpKind::QGemm {
            n: uint(f("n")?, what)?,
            act: act(f("act")?, what)?,
            spatial: match f("spatial")? {
                Value::Null => None,
                other => Some(pair(other, what)?),
            },
            dynamic: boolean(f("dynamic")?, what)?,
            window: match f("window")? {
                Value::Null => None,
                w => {
                    let g = |k: &str| pair(field(w, k, what)?, what);
                    Some(crate::ops::quant::QWindow {
                        kernel: g("kernel")?,
                        stride: g("stride")?,
                        padding: g("padding")?,
                        dilation: g("dilation")?,
                        grid: g("grid")?,
                        zero_point: zero_point(field(w, "zero_point", what)?, what)?,
                    })
                }
            },
            int8_out: match f("int8_out")? {
                Value::Null => None,
                z => Some(zero_point(z, what)?),
            },
        },
        "quantize_nhwc" => OpKind::QuantizeNhwc {
            scale: float(f("scale")?, what)?,
            zero_point: zero_point(f("zero_point")?, what)?,
        },
        "quantize_dynamic" => OpKind::QuantizeDynamic,
        "cast" => OpKind::Cast {
            to: dtype(f("to")?, what)?,
        },
        other => return Err(bad(format!("{what}: unknown op {other:?}"))),
    })
}

/// A zero point: any integer (the op's rules bound it), clamped into i32.
fn zero_point(v: &Value, what: &str) -> Result<i32> {
    Ok(int(v, what)?.clamp(i32::MIN as i64, i32::MAX as i64) as i32)
}

fn parse_graph(v: &Value) -> Result<Parsed> {
    let version = field(v, "version", "the graph")?
        .as_u64()
        .ok_or_else(|| bad("the graph's version must be an integer"))?;
    if version != VERSION && version != 1 {
        return Err(bad(format!(
            "the file has graph version {version}; this kiln reads versions 1 and {VERSION}"
        )));
    }
    let inputs = arr(field(v, "inputs", "the graph")?, "inputs")?
        .iter()
        .enumerate()
        .map(|(k, i)| {
            Ok(InputSpec {
                shape: dims(field(i, "shape", "an input")?, &format!("input {k}"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let consts = arr(field(v, "consts", "the graph")?, "consts")?
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let what = format!("constant {k}");
            Ok((
                uints(field(c, "shape", &what)?, &what)?,
                dtype(field(c, "dtype", &what)?, &what)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let nodes = arr(field(v, "nodes", "the graph")?, "nodes")?
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let what = format!("node {i}");
            let op = parse_op(field(n, "op", &what)?, &what)?;
            if version == 1 && op.output_dtype().is_some() {
                return Err(bad(format!(
                    "{what}: int8 {} of a version 1 file; quantize the model again",
                    op.name()
                )));
            }
            let inputs = arr(field(n, "inputs", &what)?, &what)?
                .iter()
                .map(|s| src(s, &what))
                .collect::<Result<Vec<_>>>()?;
            Ok(Node {
                op,
                inputs,
                shape: dims(field(n, "shape", &what)?, &what)?,
                dtype: dtype(field(n, "dtype", &what)?, &what)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let outputs = arr(field(v, "outputs", "the graph")?, "outputs")?
        .iter()
        .map(|s| src(s, "an output"))
        .collect::<Result<Vec<_>>>()?;
    if inputs.is_empty() {
        return Err(bad("the graph has no input"));
    }
    Ok(Parsed {
        inputs,
        consts,
        nodes,
        outputs,
    })
}
