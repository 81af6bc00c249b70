//! ONNX → kiln: each node of the file becomes nodes of kiln's frozen graph, checked by the
//! same shape rules as a captured model ([`OpKind::output_shape`]). Values known at load (the
//! initializers, `Constant`, and the `Shape → Gather → Concat → Reshape` chains exporters
//! write for dynamic shapes) are computed here on the host, sizes as [`Dim`]s linear in the
//! batch, so that the graph holds only the ops that run.

use std::collections::HashMap;

use super::proto as pb;
use crate::error::{Error, Result};
use crate::infer::graph::{DType, Dim, Graph, InputSpec, Node, OpKind, Src};
use crate::ops::elementwise::{BinaryOp, UnaryOp};
use crate::ops::reduce::ReduceOp;
use crate::shape::{broadcast_shapes, checked_numel, MAX_RANK};
use crate::tensor::Tensor;
use crate::{Conv2dOptions, ConvTranspose2dOptions, Device, Pool2dOptions};

pub(super) const OP: &str = "load_onnx";

/// Largest number of values one initializer may hold (4 GiB of f32); its bytes are in the
/// file, so this bounds only what the host holds per byte read.
const MAX_HOST: usize = 1 << 30;

/// Largest number of values the host computes at load (shapes, masks, small constants);
/// larger results are computed on the GPU at run time instead, or refused.
const MAX_COMPUTED: usize = 1 << 22;

/// The product of `v`, `None` on overflow.
fn checked_product(mut v: impl Iterator<Item = i128>) -> Option<i128> {
    v.try_fold(1i128, |acc, x| acc.checked_mul(x))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid(OP, msg)
}

/// Data known at load time.
#[derive(Clone, Debug)]
enum Data {
    /// Floating-point values (float, double and half tensors).
    F(Vec<f32>),
    /// Integers and booleans; sizes read from a shape may depend on the batch.
    I(Vec<Dim>),
}

/// A value of the ONNX graph.
#[derive(Clone, Debug)]
enum Val {
    /// A value of kiln's graph (an input, a constant or a node's output) and its shape.
    Run { src: Src, shape: Vec<Dim> },
    /// A value known at load, with a shape that does not depend on the batch.
    Host { shape: Vec<usize>, data: Data },
}

fn fixed(d: &[usize]) -> Vec<Dim> {
    d.iter().map(|&v| Dim::fixed(v)).collect()
}

fn int(v: i64) -> Dim {
    Dim {
        per_batch: 0,
        fixed: v,
    }
}

/// `d` at batch size `n`, signed.
fn ev(d: Dim, n: i64) -> i128 {
    d.per_batch as i128 * n as i128 + d.fixed as i128
}

/// The batch sizes shapes are evaluated at to find how they depend on the batch (not 1,
/// which squeezes would treat as special).
const PROBES: [i64; 3] = [2, 3, 4];

/// The [`Dim`] taking values `f(2), f(3), f(4)`; `None` when they are not linear in the batch.
fn fit(f: [i128; 3]) -> Option<Dim> {
    let per = f[1] - f[0];
    if f[2] - f[1] != per {
        return None;
    }
    let fixed = f[0] - 2 * per;
    Some(Dim {
        per_batch: i64::try_from(per).ok()?,
        fixed: i64::try_from(fixed).ok()?,
    })
}

/// The node being converted, for errors and attributes.
struct Ctx<'a> {
    node: &'a pb::NodeProto,
    name: String,
    op: &'a str,
}

impl Ctx<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        bad(format!("node {:?} ({}): {msg}", self.name, self.op))
    }

    fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.node.attribute.iter().find(|a| a.name() == name)
    }

    /// `Err` for any attribute not in `known`, and for a type other than the one each must
    /// have.
    fn check_attrs(&self, known: &[(&str, i32)]) -> Result<()> {
        for a in &self.node.attribute {
            let Some(&(_, want)) = known.iter().find(|(n, _)| *n == a.name()) else {
                return Err(self.err(format!("unsupported attribute {:?}", a.name())));
            };
            let have = a.r#type.unwrap_or_else(|| infer_attr_type(a));
            if have != want {
                return Err(self.err(format!(
                    "attribute {:?} has type {} where {} is expected",
                    a.name(),
                    attr_type_name(have),
                    attr_type_name(want)
                )));
            }
        }
        Ok(())
    }

    fn int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).and_then(|a| a.i).unwrap_or(default)
    }

    fn float(&self, name: &str, default: f32) -> f32 {
        self.attr(name).and_then(|a| a.f).unwrap_or(default)
    }

    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }

    fn string(&self, name: &str) -> Option<String> {
        self.attr(name)
            .and_then(|a| a.s.as_ref())
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }

    /// The k-th input's name, `None` when absent or empty (an omitted optional input).
    fn input(&self, k: usize) -> Option<&str> {
        self.node
            .input
            .get(k)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    fn need(&self, k: usize) -> Result<&str> {
        self.input(k)
            .ok_or_else(|| self.err(format!("input {k} is missing")))
    }
}

const FLOAT: i32 = 1;
const INT: i32 = 2;
const STRING: i32 = 3;
const TENSOR: i32 = 4;
const FLOATS: i32 = 6;
const INTS: i32 = 7;

/// True when a host shape's sizes are kernel-sized and its element count, zero sizes read as
/// one (so that strides stay small too), is at most `limit`.
fn host_shape_ok(shape: &[usize], limit: usize) -> bool {
    shape.len() <= MAX_RANK
        && shape.iter().all(|&d| d <= u32::MAX as usize)
        && shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d.max(1)))
            .is_some_and(|n| n <= limit)
}

/// True when `d` >= 0 at every batch size N >= 1 (it is linear in N).
fn at_least_zero(d: Dim) -> bool {
    ev(d, 1) >= 0 && d.per_batch >= 0
}

/// True when `d` <= 0 at every batch size N >= 1.
fn at_most_zero(d: Dim) -> bool {
    ev(d, 1) <= 0 && d.per_batch <= 0
}

/// A Slice bound `v` on an axis of size `dim`, clamped as ONNX clamps it (negative counts
/// from the end, then into [0, dim]), for every batch size; `Err` when the clamping depends on
/// the batch size in a way a linear size cannot say.
fn slice_bound(cx: &Ctx, v: Dim, dim: Dim) -> Result<Dim> {
    const FAR: i64 = u32::MAX as i64;
    let sub = |a: Dim, b: Dim| dim_op(cx, BinaryOp::Sub, a, b);
    let ambiguous = || cx.err(format!("slice bound {v:?} on an axis of size {dim:?}"));
    if v.is_dynamic() {
        return if at_least_zero(v) && at_least_zero(sub(dim, v)?) {
            Ok(v)
        } else {
            Err(ambiguous())
        };
    }
    if v.fixed <= -FAR {
        return Ok(int(0));
    }
    if v.fixed >= FAR {
        return Ok(dim);
    }
    let from_end = v.fixed < 0;
    let r = if from_end {
        dim_op(cx, BinaryOp::Add, dim, v)?
    } else {
        v
    };
    if at_least_zero(r) && at_least_zero(sub(dim, r)?) {
        Ok(r)
    } else if from_end && at_most_zero(r) {
        Ok(int(0))
    } else if !from_end && at_most_zero(sub(dim, r)?) {
        Ok(dim)
    } else {
        Err(ambiguous())
    }
}

/// Whether a size is non-zero, for every batch size; `Err` when that depends on the batch.
fn nonzero(cx: &Ctx, d: Dim) -> Result<bool> {
    always_eq(cx, d, int(0)).map(|eq| !eq)
}

/// Whether two sizes are equal, for every batch size N >= 1; `Err` when they are equal for
/// some batch sizes only.
fn always_eq(cx: &Ctx, a: Dim, b: Dim) -> Result<bool> {
    if a == b {
        return Ok(true);
    }
    let (per, fixed) = (
        a.per_batch as i128 - b.per_batch as i128,
        a.fixed as i128 - b.fixed as i128,
    );
    // a - b = per N + fixed vanishes at N = -fixed / per.
    if per != 0 && fixed % per == 0 && -fixed / per >= 1 {
        return Err(cx.err(format!(
            "{a:?} and {b:?} are equal only at batch size {}",
            -fixed / per
        )));
    }
    Ok(false)
}

/// An attribute name and the type it must have.
fn a(name: &'static str, t: i32) -> (&'static str, i32) {
    (name, t)
}

fn infer_attr_type(a: &pb::AttributeProto) -> i32 {
    if a.f.is_some() {
        FLOAT
    } else if a.i.is_some() {
        INT
    } else if a.s.is_some() {
        STRING
    } else if a.t.is_some() {
        TENSOR
    } else if !a.floats.is_empty() {
        FLOATS
    } else if !a.ints.is_empty() {
        INTS
    } else {
        0
    }
}

fn attr_type_name(t: i32) -> String {
    match t {
        FLOAT => "FLOAT".into(),
        INT => "INT".into(),
        STRING => "STRING".into(),
        TENSOR => "TENSOR".into(),
        FLOATS => "FLOATS".into(),
        INTS => "INTS".into(),
        other => format!("type {other}"),
    }
}

/// ONNX tensor element types kiln reads.
pub(super) mod elem {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
}

/// The values of a tensor stored in the file.
fn tensor_data(t: &pb::TensorProto, what: &str) -> Result<(Vec<usize>, Data)> {
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Err(bad(format!(
            "{what} keeps its data in an external file, which kiln does not read"
        )));
    }
    if t.dims.len() > MAX_RANK {
        return Err(bad(format!(
            "{what} has rank {}, beyond {MAX_RANK}",
            t.dims.len()
        )));
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(bad(format!("{what} has a negative size in {:?}", t.dims)));
        }
        shape.push(usize::try_from(d).map_err(|_| bad(format!("{what}: size {d}")))?);
    }
    if !host_shape_ok(&shape, MAX_HOST) {
        return Err(bad(format!("{what} of shape {shape:?} is too large")));
    }
    let n = checked_numel(&shape).unwrap_or(0);
    let raw = t.raw_data.as_deref().filter(|r| !r.is_empty());
    let dt = t.data_type.unwrap_or(0);
    let count_err = |got: usize| {
        bad(format!(
            "{what} of shape {shape:?} holds {got} values, not {n}"
        ))
    };
    let width = match dt {
        elem::FLOAT | elem::INT32 => 4,
        elem::INT64 | elem::DOUBLE => 8,
        elem::BOOL | elem::UINT8 | elem::INT8 => 1,
        elem::FLOAT16 => 2,
        other => {
            return Err(bad(format!(
                "{what} has element type {other}, which kiln does not read"
            )))
        }
    };
    if let Some(r) = raw {
        if r.len() != n * width {
            return Err(count_err(r.len() / width));
        }
    }
    let data = match dt {
        elem::FLOAT => Data::F(match raw {
            Some(r) => r
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            None if t.float_data.len() == n => t.float_data.clone(),
            None => return Err(count_err(t.float_data.len())),
        }),
        elem::DOUBLE => Data::F(match raw {
            Some(r) => r
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            None if t.double_data.len() == n => t.double_data.iter().map(|&v| v as f32).collect(),
            None => return Err(count_err(t.double_data.len())),
        }),
        elem::FLOAT16 => Data::F(match raw {
            Some(r) => r
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            None if t.int32_data.len() == n => t
                .int32_data
                .iter()
                .map(|&v| half::f16::from_bits(v as u16).to_f32())
                .collect(),
            None => return Err(count_err(t.int32_data.len())),
        }),
        elem::INT64 => Data::I(match raw {
            Some(r) => r
                .chunks_exact(8)
                .map(|c| int(i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))))
                .collect(),
            None if t.int64_data.len() == n => t.int64_data.iter().map(|&v| int(v)).collect(),
            None => return Err(count_err(t.int64_data.len())),
        }),
        elem::INT32 => Data::I(match raw {
            Some(r) => r
                .chunks_exact(4)
                .map(|c| int(i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64))
                .collect(),
            None if t.int32_data.len() == n => {
                t.int32_data.iter().map(|&v| int(v as i64)).collect()
            }
            None => return Err(count_err(t.int32_data.len())),
        }),
        _ => Data::I(match raw {
            Some(r) => r
                .iter()
                .map(|&b| {
                    int(if dt == elem::INT8 {
                        b as i8 as i64
                    } else {
                        b as i64
                    })
                })
                .collect(),
            None if t.int32_data.len() == n => {
                t.int32_data.iter().map(|&v| int(v as i64)).collect()
            }
            None => return Err(count_err(t.int32_data.len())),
        }),
    };
    Ok((shape, data))
}

struct Importer<'a> {
    device: &'a Device,
    g: Graph,
    vals: HashMap<String, Val>,
    /// Constants uploaded for a host value, by its name.
    uploaded: HashMap<String, Src>,
    opset: i64,
    /// Host values made so far, in elements, and the most allowed (copies of initializers
    /// and values computed at load).
    host_elems: usize,
    host_budget: usize,
    /// Run-time values that hold integers (as f32): casts to integer types, argmax.
    ints: std::collections::HashSet<Src>,
    /// Constants uploaded from integers known at load.
    int_consts: std::collections::HashSet<usize>,
    /// Transposed or scaled copies of weights, by initializer name and transform.
    weights: HashMap<(String, String), (Src, Vec<usize>)>,
}

/// Builds kiln's graph from a parsed model.
pub(super) fn import(model: &pb::ModelProto, device: &Device) -> Result<Graph> {
    let mut opset = None;
    for o in &model.opset_import {
        match o.domain() {
            "" | "ai.onnx" => opset = Some(o.version()),
            other => {
                return Err(bad(format!(
                    "operator set {other:?} (version {}) is not supported",
                    o.version()
                )))
            }
        }
    }
    let opset = opset.ok_or_else(|| bad("the model imports no ONNX operator set"))?;
    if !(7..=23).contains(&opset) {
        return Err(bad(format!(
            "operator set version {opset} is not supported (7 to 23 are)"
        )));
    }
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| bad("the model has no graph"))?;
    let mut im = Importer {
        device,
        g: Graph {
            inputs: Vec::new(),
            consts: Vec::new(),
            const_dtypes: Vec::new(),
            nodes: Vec::new(),
            outputs: Vec::new(),
        },
        vals: HashMap::new(),
        uploaded: HashMap::new(),
        opset,
        host_elems: 0,
        host_budget: 0,
        ints: Default::default(),
        int_consts: Default::default(),
        weights: HashMap::new(),
    };
    let mut init_elems = 0usize;
    for t in &graph.initializer {
        let name = t.name().to_string();
        let (shape, data) = tensor_data(t, &format!("initializer {name:?}"))?;
        init_elems += checked_numel(&shape).unwrap_or(0);
        im.vals.insert(name, Val::Host { shape, data });
    }
    im.host_budget = init_elems
        .saturating_mul(4)
        .saturating_add(MAX_COMPUTED * 16);
    let read: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .chain(graph.output.iter().map(|o| o.name()))
        .collect();
    im.inputs(graph)?;
    for (k, node) in graph.node.iter().enumerate() {
        let name = match node.name() {
            "" => format!("#{k}"),
            n => n.to_string(),
        };
        let cx = Ctx {
            node,
            name,
            op: node.op_type(),
        };
        match node.domain() {
            "" | "ai.onnx" => {}
            d => return Err(cx.err(format!("domain {d:?} is not supported"))),
        }
        let outs = im.node(&cx)?;
        for v in &outs {
            if let Val::Host { shape, .. } = v {
                im.host_elems = im
                    .host_elems
                    .saturating_add(checked_numel(shape).unwrap_or(usize::MAX));
                if im.host_elems > im.host_budget {
                    return Err(cx.err(format!(
                        "values computed at load exceed {} elements",
                        im.host_budget
                    )));
                }
            }
        }
        if outs.len() < node.output.len() {
            // Extra outputs (a pool's indices, dropout's mask) are fine unless read.
            for extra in &node.output[outs.len()..] {
                if !extra.is_empty() && read.contains(extra.as_str()) {
                    return Err(cx.err(format!(
                        "output {extra:?} is read, and kiln computes only the first {}",
                        outs.len()
                    )));
                }
            }
        }
        for (name, v) in node.output.iter().zip(outs) {
            if !name.is_empty() {
                im.vals.insert(name.clone(), v);
            }
        }
    }
    for o in &graph.output {
        let name = o.name();
        let v = im.get(name).map_err(|_| {
            bad(format!(
                "graph output {name:?} is not produced by any node, input or initializer"
            ))
        })?;
        let src = match v {
            Val::Run { src, .. } => src,
            Val::Host { .. } => im.upload(name)?.0,
        };
        im.g.outputs.push(src);
    }
    if im.g.outputs.is_empty() {
        return Err(bad("the graph has no outputs"));
    }
    Ok(im.g)
}

impl Importer<'_> {
    /// The graph inputs that are not initializers; one symbolic size, the batch.
    fn inputs(&mut self, graph: &pb::GraphProto) -> Result<()> {
        let mut symbol: Option<String> = None;
        for vi in &graph.input {
            let name = vi.name().to_string();
            if self.vals.contains_key(&name) {
                continue; // an initializer listed as an input (older exporters)
            }
            let what = format!("input {name:?}");
            let tt = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(pb::type_proto::Value::TensorType(t)) => t,
                _ => return Err(bad(format!("{what} is not a tensor"))),
            };
            if tt.elem_type() != elem::FLOAT {
                return Err(bad(format!(
                    "{what} has element type {}: kiln's ONNX inputs are float32",
                    tt.elem_type()
                )));
            }
            let dims = &tt
                .shape
                .as_ref()
                .ok_or_else(|| bad(format!("{what} has no shape")))?
                .dim;
            if dims.len() > MAX_RANK {
                return Err(bad(format!(
                    "{what} has rank {} beyond {MAX_RANK}",
                    dims.len()
                )));
            }
            let mut shape = Vec::with_capacity(dims.len());
            for (axis, d) in dims.iter().enumerate() {
                use pb::tensor_shape_proto::dimension::Value as V;
                shape.push(match &d.value {
                    Some(V::DimValue(v)) if *v >= 0 && *v <= u32::MAX as i64 => {
                        Dim::fixed(*v as usize)
                    }
                    Some(V::DimParam(p)) => {
                        match &symbol {
                            None => symbol = Some(p.clone()),
                            Some(s) if s == p => {}
                            Some(s) => {
                                return Err(bad(format!(
                                    "{what} has symbolic size {p:?} at axis {axis}, and {s:?} is \
                                     already the batch: kiln supports one symbolic size"
                                )))
                            }
                        }
                        Dim {
                            per_batch: 1,
                            fixed: 0,
                        }
                    }
                    other => return Err(bad(format!("{what} has size {other:?} at axis {axis}"))),
                });
            }
            let k = self.g.inputs.len();
            self.g.inputs.push(InputSpec {
                shape: shape.clone(),
            });
            self.vals.insert(
                name,
                Val::Run {
                    src: Src::Input(k),
                    shape,
                },
            );
        }
        if self.g.inputs.is_empty() {
            return Err(bad("the graph has no inputs"));
        }
        Ok(())
    }

    fn mark_int(&mut self, v: &Val) {
        if let Val::Run { src, .. } = v {
            self.ints.insert(*src);
        }
    }

    fn get(&self, name: &str) -> Result<Val> {
        self.vals.get(name).cloned().ok_or_else(|| {
            bad(format!(
                "value {name:?} is read before any node, input or initializer makes it"
            ))
        })
    }

    /// `name` as an operand of a kiln node: host values become (cached) constants.
    fn upload(&mut self, name: &str) -> Result<(Src, Vec<Dim>)> {
        match self.get(name)? {
            Val::Run { src, shape } => Ok((src, shape)),
            Val::Host { shape, data } => {
                if let Some(&src) = self.uploaded.get(name) {
                    return Ok((src, fixed(&shape)));
                }
                let is_int = matches!(data, Data::I(_));
                let values: Vec<f32> = match data {
                    Data::F(v) => v,
                    Data::I(v) => v
                        .iter()
                        .map(|d| {
                            if d.is_dynamic() {
                                Err(bad(format!(
                                    "value {name:?} holds a size that depends on the batch \
                                     and is read as a tensor"
                                )))
                            } else {
                                Ok(d.fixed as f32)
                            }
                        })
                        .collect::<Result<_>>()?,
                };
                let src = self.add_const(Tensor::from_slice(&values, &shape, self.device)?);
                self.uploaded.insert(name.to_string(), src);
                if let (true, Src::Const(k)) = (is_int, src) {
                    self.int_consts.insert(k);
                }
                Ok((src, fixed(&shape)))
            }
        }
    }

    /// A constant made from initializer `name` by `transform` (named by `key`), made once
    /// however many nodes read it.
    fn derived_const(
        &mut self,
        name: &str,
        key: String,
        transform: impl FnOnce(Vec<usize>, Vec<f32>) -> (Vec<usize>, Vec<f32>),
    ) -> Option<Result<(Src, Vec<usize>)>> {
        let k = (name.to_string(), key);
        if let Some(v) = self.weights.get(&k) {
            return Some(Ok(v.clone()));
        }
        let (shape, values) = self.const_floats(name)?;
        let (shape, values) = transform(shape, values);
        let t = match Tensor::from_slice(&values, &shape, self.device) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        let src = self.add_const(t);
        self.weights.insert(k, (src, shape.clone()));
        Some(Ok((src, shape)))
    }

    fn add_const(&mut self, t: Tensor) -> Src {
        self.g.const_dtypes.push(t.dtype());
        self.g.consts.push(t);
        Src::Const(self.g.consts.len() - 1)
    }

    fn shape_of(&self, name: &str) -> Result<Vec<Dim>> {
        match self.vals.get(name) {
            Some(Val::Run { shape, .. }) => Ok(shape.clone()),
            Some(Val::Host { shape, .. }) => Ok(fixed(shape)),
            None => self.get(name).map(|_| Vec::new()),
        }
    }

    /// A kiln node over `ins`; its shape is checked by the op's shape rule at several batch
    /// sizes.
    fn emit(&mut self, cx: &Ctx, op: OpKind, ins: Vec<(Src, Vec<Dim>)>) -> Result<Val> {
        let mut outs: Vec<Vec<usize>> = Vec::new();
        for n in PROBES {
            let shapes: Vec<Vec<usize>> = ins
                .iter()
                .map(|(_, s)| s.iter().map(|d| d.at(n as usize)).collect())
                .collect::<Result<_>>()
                .map_err(|e| cx.err(e))?;
            let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
            outs.push(op.output_shape(&refs, n as usize).map_err(|e| cx.err(e))?);
        }
        if outs[0].len() != outs[1].len() || outs[1].len() != outs[2].len() {
            return Err(cx.err("the output's rank depends on the batch size"));
        }
        let shape = (0..outs[0].len())
            .map(|i| {
                fit([outs[0][i] as i128, outs[1][i] as i128, outs[2][i] as i128])
                    .ok_or_else(|| cx.err("an output size is not linear in the batch size"))
            })
            .collect::<Result<Vec<Dim>>>()?;
        self.g.nodes.push(Node {
            op,
            inputs: ins.iter().map(|(s, _)| *s).collect(),
            shape: shape.clone(),
            dtype: DType::F32,
        });
        Ok(Val::Run {
            src: Src::Node(self.g.nodes.len() - 1),
            shape,
        })
    }

    /// A node reading one value.
    fn emit1(&mut self, cx: &Ctx, op: OpKind, x: &str) -> Result<Val> {
        let x = self.upload(x)?;
        self.emit(cx, op, vec![x])
    }

    /// Integers known at load (a shape, axes, pads), with sizes that may depend on the batch.
    fn host_ints(&self, cx: &Ctx, name: &str) -> Result<Vec<Dim>> {
        match self.get(name)? {
            Val::Host {
                data: Data::I(v), ..
            } => Ok(v),
            _ => Err(cx.err(format!(
                "input {name:?} must be integers known at load time"
            ))),
        }
    }

    /// Integers known at load that do not depend on the batch.
    fn const_ints(&self, cx: &Ctx, name: &str) -> Result<Vec<i64>> {
        self.host_ints(cx, name)?
            .into_iter()
            .map(|d| {
                if d.is_dynamic() {
                    Err(cx.err(format!("input {name:?} depends on the batch size")))
                } else {
                    Ok(d.fixed)
                }
            })
            .collect()
    }

    /// A float known at load, from a one-element tensor.
    fn const_scalar(&self, name: &str) -> Option<f32> {
        match self.vals.get(name)? {
            Val::Host {
                data: Data::F(v), ..
            } if v.len() == 1 => Some(v[0]),
            Val::Host {
                data: Data::I(v), ..
            } if v.len() == 1 && !v[0].is_dynamic() => Some(v[0].fixed as f32),
            _ => None,
        }
    }

    /// A float tensor known at load, with its shape.
    fn const_floats(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        match self.vals.get(name)? {
            Val::Host {
                shape,
                data: Data::F(v),
            } => Some((shape.clone(), v.clone())),
            _ => None,
        }
    }

    /// Converts one node; returns its outputs.
    fn node(&mut self, cx: &Ctx) -> Result<Vec<Val>> {
        Ok(vec![match cx.op {
            "Identity" | "Dropout" => {
                cx.check_attrs(&[a("seed", INT), a("ratio", FLOAT), a("is_test", INT)])?;
                if cx.input(2).is_some() {
                    if let Some(v) = self.const_scalar(cx.need(2)?) {
                        if v != 0.0 {
                            return Err(cx.err("training mode is not supported"));
                        }
                    } else {
                        return Err(cx.err("training mode must be known at load time"));
                    }
                }
                self.get(cx.need(0)?)?
            }
            "Constant" => self.constant(cx)?,
            "Shape" => {
                cx.check_attrs(&[a("start", INT), a("end", INT)])?;
                let s = self.shape_of(cx.need(0)?)?;
                let r = s.len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let (b, e) = (clampi(cx.int("start", 0)), clampi(cx.int("end", r)));
                let v: Vec<Dim> = s[b..e.max(b)].to_vec();
                Val::Host {
                    shape: vec![v.len()],
                    data: Data::I(v),
                }
            }
            "ConstantOfShape" => {
                cx.check_attrs(&[a("value", TENSOR)])?;
                let dims = self.host_ints(cx, cx.need(0)?)?;
                let (value, is_int) = match cx.attr("value").and_then(|a| a.t.as_ref()) {
                    None => (0.0, None),
                    Some(t) => match tensor_data(t, "the value")?.1 {
                        Data::F(v) if v.len() == 1 => (v[0], None),
                        Data::I(v) if v.len() == 1 && !v[0].is_dynamic() => {
                            (v[0].fixed as f32, Some(v[0]))
                        }
                        _ => return Err(cx.err("value must hold one element")),
                    },
                };
                let small = dims.iter().all(|d| !d.is_dynamic())
                    && dims
                        .iter()
                        .try_fold(1i64, |acc, d| acc.checked_mul(d.fixed.max(0)))
                        .is_some_and(|n| n as usize <= MAX_COMPUTED);
                if dims.iter().any(|d| d.fixed < 0 && !d.is_dynamic()) {
                    return Err(cx.err(format!("a negative size in {dims:?}")));
                }
                if !small {
                    // Batch-dependent or large: filled on the GPU when the model runs.
                    if is_int.is_some() {
                        return Err(cx.err("a large or batch-dependent integer tensor"));
                    }
                    let op = OpKind::Full { shape: dims, value };
                    self.emit(cx, op, Vec::new())?
                } else {
                    let shape: Vec<usize> = dims.iter().map(|d| d.fixed as usize).collect();
                    let n = checked_numel(&shape).unwrap_or(0);
                    let data = if let Some(v) = is_int {
                        Data::I(vec![v; n])
                    } else {
                        Data::F(vec![value; n])
                    };
                    Val::Host { shape, data }
                }
            }
            "Cast" | "CastLike" => {
                cx.check_attrs(&[a("to", INT), a("saturate", INT), a("round_mode", STRING)])?;
                let to = if cx.op == "CastLike" {
                    // The type of the second input: integers known at load or at run time,
                    // or float.
                    let like = cx.need(1)?;
                    match self.get(like)? {
                        Val::Host {
                            data: Data::I(_), ..
                        } => elem::INT64,
                        Val::Run { src, .. } if self.ints.contains(&src) => elem::INT64,
                        _ => elem::FLOAT,
                    }
                } else {
                    cx.int("to", 0) as i32
                };
                let float = matches!(to, elem::FLOAT | elem::DOUBLE | elem::FLOAT16);
                // Integer types: wrapping to the type's width on the host.
                let wrap = |v: i64| -> i64 {
                    match to {
                        elem::INT8 => v as i8 as i64,
                        elem::UINT8 => v as u8 as i64,
                        4 => v as u16 as i64,
                        5 => v as i16 as i64,
                        elem::INT32 => v as i32 as i64,
                        12 => v as u32 as i64,
                        _ => v,
                    }
                };
                if !float && !matches!(to, 2..=7 | 9 | 12 | 13) {
                    return Err(cx.err(format!("cast to element type {to} is not supported")));
                }
                let x = cx.need(0)?;
                match self.get(x)? {
                    Val::Host { shape, data } => Val::Host {
                        shape,
                        data: match (data, float, to) {
                            (Data::F(v), true, _) => Data::F(v),
                            (Data::I(v), false, elem::BOOL) => Data::I(
                                v.iter()
                                    .map(|&d| nonzero(cx, d).map(|b| int(b as i64)))
                                    .collect::<Result<_>>()?,
                            ),
                            (Data::I(v), false, _) => Data::I(
                                v.iter()
                                    .map(|&d| {
                                        if d.is_dynamic() {
                                            d
                                        } else {
                                            int(wrap(d.fixed))
                                        }
                                    })
                                    .collect(),
                            ),
                            (Data::F(v), false, t) => Data::I(
                                v.iter()
                                    .map(|&f| {
                                        int(if t == elem::BOOL {
                                            (f != 0.0) as i64
                                        } else {
                                            wrap(f as i64)
                                        })
                                    })
                                    .collect(),
                            ),
                            (Data::I(v), true, _) => Data::F(
                                v.iter()
                                    .map(|d| {
                                        if d.is_dynamic() {
                                            Err(cx.err("a batch-dependent size cast to float"))
                                        } else {
                                            Ok(d.fixed as f32)
                                        }
                                    })
                                    .collect::<Result<_>>()?,
                            ),
                        },
                    },
                    run @ Val::Run { .. } if float => run,
                    Val::Run { .. } if to == elem::BOOL => {
                        let op = OpKind::BinaryScalar {
                            op: BinaryOp::Ne,
                            scalar: 0.0,
                            left: false,
                        };
                        self.emit1(cx, op, x)?
                    }
                    // Integers computed at run time are held as f32 (exact to 2^24), rounded
                    // toward zero as a cast does.
                    Val::Run { .. } => {
                        let op = OpKind::Unary {
                            op: UnaryOp::Trunc,
                            alpha: 0.0,
                            beta: 0.0,
                        };
                        let v = self.emit1(cx, op, x)?;
                        self.mark_int(&v);
                        v
                    }
                }
            }
            "Reshape" => {
                cx.check_attrs(&[a("allowzero", INT)])?;
                let x = cx.need(0)?;
                let target = self.host_ints(cx, cx.need(1)?)?;
                let shape = self.reshape_target(
                    cx,
                    &self.shape_of(x)?,
                    &target,
                    cx.int("allowzero", 0) != 0,
                )?;
                self.reshape(cx, x, shape)?
            }
            "Flatten" => {
                cx.check_attrs(&[a("axis", INT)])?;
                let x = cx.need(0)?;
                let s = self.shape_of(x)?;
                let (r, v) = (s.len() as i64, cx.int("axis", 1));
                let axis = if v < 0 { v + r } else { v };
                if !(0..=r).contains(&axis) {
                    return Err(cx.err(format!("axis {v} is out of range for rank {r}")));
                }
                let axis = axis as usize;
                let shape = vec![product(cx, &s[..axis])?, product(cx, &s[axis..])?];
                self.reshape(cx, x, shape)?
            }
            "Unsqueeze" => {
                cx.check_attrs(&[a("axes", INTS)])?;
                let x = cx.need(0)?;
                let axes = match cx.input(1) {
                    Some(n) => self.const_ints(cx, n)?,
                    None => cx.ints("axes").ok_or_else(|| cx.err("needs axes"))?,
                };
                let mut s = self.shape_of(x)?;
                let rank = s.len() + axes.len();
                if rank > MAX_RANK {
                    return Err(cx.err(format!("rank {rank} exceeds {MAX_RANK}")));
                }
                let mut axes = axes
                    .iter()
                    .map(|&v| norm_axis(cx, v, rank))
                    .collect::<Result<Vec<_>>>()?;
                axes.sort_unstable();
                if axes.windows(2).any(|w| w[0] == w[1]) {
                    return Err(cx.err(format!("repeated axes {axes:?}")));
                }
                for &ax in &axes {
                    s.insert(ax, Dim::fixed(1));
                }
                self.reshape(cx, x, s)?
            }
            "Squeeze" => {
                cx.check_attrs(&[a("axes", INTS)])?;
                let x = cx.need(0)?;
                let s = self.shape_of(x)?;
                let axes = match cx.input(1) {
                    Some(n) => Some(self.const_ints(cx, n)?),
                    None => cx.ints("axes"),
                };
                let keep: Vec<Dim> = match axes {
                    None => {
                        let mut keep = Vec::with_capacity(s.len());
                        for &d in &s {
                            if !always_eq(cx, d, Dim::fixed(1))? {
                                keep.push(d);
                            }
                        }
                        keep
                    }
                    Some(axes) => {
                        let axes = axes
                            .iter()
                            .map(|&v| norm_axis(cx, v, s.len()))
                            .collect::<Result<Vec<_>>>()?;
                        for &ax in &axes {
                            if s[ax] != Dim::fixed(1) {
                                return Err(cx.err(format!(
                                    "axis {ax} of shape {s:?} does not have size 1"
                                )));
                            }
                        }
                        s.iter()
                            .enumerate()
                            .filter(|(i, _)| !axes.contains(i))
                            .map(|(_, &d)| d)
                            .collect()
                    }
                };
                self.reshape(cx, x, keep)?
            }
            "Transpose" => {
                cx.check_attrs(&[a("perm", INTS)])?;
                let x = cx.need(0)?;
                let rank = self.shape_of(x)?.len();
                let perm = match cx.ints("perm") {
                    Some(p) => p
                        .iter()
                        .map(|&v| usize::try_from(v).map_err(|_| cx.err(format!("perm {p:?}"))))
                        .collect::<Result<Vec<_>>>()?,
                    None => (0..rank).rev().collect(),
                };
                match self.get(x)? {
                    Val::Host { shape, data } => host_transpose(cx, &shape, &data, &perm)?,
                    Val::Run { .. } => self.emit1(cx, OpKind::Permute { perm }, x)?,
                }
            }
            "Expand" => {
                cx.check_attrs(&[])?;
                let x = cx.need(0)?;
                let s = self.shape_of(x)?;
                let target = self.host_ints(cx, cx.need(1)?)?;
                let rank = s.len().max(target.len());
                let mut out = Vec::with_capacity(rank);
                for i in 0..rank {
                    let a = (i + s.len())
                        .checked_sub(rank)
                        .map(|k| s[k])
                        .unwrap_or(Dim::fixed(1));
                    let b = (i + target.len())
                        .checked_sub(rank)
                        .map(|k| target[k])
                        .unwrap_or(Dim::fixed(1));
                    out.push(if b == Dim::fixed(1) {
                        a
                    } else if a == Dim::fixed(1) || a == b {
                        b
                    } else {
                        return Err(cx.err(format!("cannot expand {s:?} to {target:?}")));
                    });
                }
                match self.get(x)? {
                    Val::Host { shape, data }
                        if out.iter().all(|d| !d.is_dynamic())
                            && fixed_count(&out).is_some_and(|n| n as usize <= MAX_COMPUTED) =>
                    {
                        let target: Vec<usize> = out
                            .iter()
                            .map(|d| {
                                usize::try_from(d.fixed)
                                    .map_err(|_| cx.err(format!("a negative size in {out:?}")))
                            })
                            .collect::<Result<_>>()?;
                        let (shape, maps) = broadcast_index(cx, &[&shape, &target])?;
                        let data = pick(&data, maps[0].iter().copied());
                        Val::Host { shape, data }
                    }
                    _ => self.emit1(cx, OpKind::Expand { shape: out }, x)?,
                }
            }
            "Concat" => {
                cx.check_attrs(&[a("axis", INT)])?;
                let axis = cx
                    .attr("axis")
                    .and_then(|a| a.i)
                    .ok_or_else(|| cx.err("needs the axis attribute"))?;
                let names: Vec<&str> = cx.node.input.iter().map(String::as_str).collect();
                if names.is_empty() || names.iter().any(|n| n.is_empty()) {
                    return Err(cx.err("needs one or more inputs"));
                }
                let all_ints = names.iter().all(|n| {
                    matches!(
                        self.vals.get(*n),
                        Some(Val::Host {
                            data: Data::I(_),
                            ..
                        })
                    )
                });
                if all_ints {
                    host_concat(
                        cx,
                        &names
                            .iter()
                            .map(|n| self.get(n))
                            .collect::<Result<Vec<_>>>()?,
                        axis,
                    )?
                } else {
                    let ins = names
                        .iter()
                        .map(|n| self.upload(n))
                        .collect::<Result<Vec<_>>>()?;
                    let rank = ins[0].1.len();
                    norm_axis(cx, axis, rank)?;
                    self.emit(
                        cx,
                        OpKind::Concat {
                            axis: axis as isize,
                        },
                        ins,
                    )?
                }
            }
            "Split" => return self.split(cx),
            "Slice" => self.slice(cx)?,
            "Gather" => self.gather(cx)?,
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "Greater"
            | "LessOrEqual" | "GreaterOrEqual" | "Max" | "Min" => self.binary(cx)?,
            "Where" => {
                cx.check_attrs(&[])?;
                let names = [cx.need(0)?, cx.need(1)?, cx.need(2)?];
                let vals = names
                    .iter()
                    .map(|n| self.get(n))
                    .collect::<Result<Vec<_>>>()?;
                let shapes: Vec<&[usize]> = vals
                    .iter()
                    .filter_map(|v| match v {
                        Val::Host { shape, .. } => Some(shape.as_slice()),
                        Val::Run { .. } => None,
                    })
                    .collect();
                if shapes.len() == 3 && small_broadcast(&shapes) {
                    host_where(cx, &vals)?
                } else {
                    let ins = names
                        .iter()
                        .map(|n| self.upload(n))
                        .collect::<Result<Vec<_>>>()?;
                    self.emit(cx, OpKind::Where, ins)?
                }
            }
            "Not" => {
                cx.check_attrs(&[])?;
                let x = cx.need(0)?;
                match self.get(x)? {
                    Val::Host {
                        shape,
                        data: Data::I(v),
                    } => Val::Host {
                        shape,
                        data: Data::I(
                            v.iter()
                                .map(|&d| nonzero(cx, d).map(|b| int(!b as i64)))
                                .collect::<Result<_>>()?,
                        ),
                    },
                    _ => {
                        let op = OpKind::BinaryScalar {
                            op: BinaryOp::Eq,
                            scalar: 0.0,
                            left: false,
                        };
                        self.emit1(cx, op, x)?
                    }
                }
            }
            "Relu" | "Sigmoid" | "Tanh" | "Exp" | "Log" | "Sqrt" | "Erf" | "Neg" | "Abs"
            | "Sin" | "Cos" | "Softplus" => {
                cx.check_attrs(&[])?;
                let op = match cx.op {
                    "Relu" => UnaryOp::Relu,
                    "Sigmoid" => UnaryOp::Sigmoid,
                    "Tanh" => UnaryOp::Tanh,
                    "Exp" => UnaryOp::Exp,
                    "Log" => UnaryOp::Log,
                    "Sqrt" => UnaryOp::Sqrt,
                    "Erf" => UnaryOp::Erf,
                    "Neg" => UnaryOp::Neg,
                    "Abs" => UnaryOp::Abs,
                    "Sin" => UnaryOp::Sin,
                    "Cos" => UnaryOp::Cos,
                    _ => UnaryOp::Softplus,
                };
                // Softplus: beta 1; ONNX has no threshold, so one beyond f32's reach of e^x.
                let (alpha, beta) = if op == UnaryOp::Softplus {
                    (1.0, 80.0)
                } else {
                    (0.0, 0.0)
                };
                self.emit1(cx, OpKind::Unary { op, alpha, beta }, cx.need(0)?)?
            }
            "Reciprocal" => {
                cx.check_attrs(&[])?;
                let op = OpKind::BinaryScalar {
                    op: BinaryOp::Div,
                    scalar: 1.0,
                    left: true,
                };
                self.emit1(cx, op, cx.need(0)?)?
            }
            "LeakyRelu" => {
                cx.check_attrs(&[a("alpha", FLOAT)])?;
                let op = OpKind::Unary {
                    op: UnaryOp::LeakyRelu,
                    alpha: cx.float("alpha", 0.01),
                    beta: 0.0,
                };
                self.emit1(cx, op, cx.need(0)?)?
            }
            "Gelu" => {
                cx.check_attrs(&[a("approximate", STRING)])?;
                let op = match cx.string("approximate").as_deref() {
                    None | Some("none") => UnaryOp::Gelu,
                    Some("tanh") => UnaryOp::GeluTanh,
                    Some(o) => return Err(cx.err(format!("approximate = {o:?}"))),
                };
                let op = OpKind::Unary {
                    op,
                    alpha: 0.0,
                    beta: 0.0,
                };
                self.emit1(cx, op, cx.need(0)?)?
            }
            "Clip" => {
                cx.check_attrs(&[a("min", FLOAT), a("max", FLOAT)])?;
                let bound = |k: usize, attr: &str, default: f32| -> Result<f32> {
                    match cx.input(k) {
                        Some(n) => self
                            .const_scalar(n)
                            .ok_or_else(|| cx.err(format!("bound {n:?} must be known at load"))),
                        None => Ok(cx.float(attr, default)),
                    }
                };
                let op = OpKind::Unary {
                    op: UnaryOp::Clamp,
                    alpha: bound(1, "min", f32::NEG_INFINITY)?,
                    beta: bound(2, "max", f32::INFINITY)?,
                };
                self.emit1(cx, op, cx.need(0)?)?
            }
            "Softmax" | "LogSoftmax" => {
                cx.check_attrs(&[a("axis", INT)])?;
                let x = cx.need(0)?;
                let rank = self.shape_of(x)?.len();
                let default = if self.opset >= 13 { -1 } else { 1 };
                let axis = norm_axis(cx, cx.int("axis", default), rank)?;
                if self.opset < 13 && axis + 1 != rank {
                    return Err(cx.err(format!(
                        "before opset 13, softmax over axes {axis}.. flattens them: only the \
                         last axis is supported"
                    )));
                }
                let op = OpKind::Softmax {
                    axis: axis as isize,
                    log: cx.op == "LogSoftmax",
                };
                self.emit1(cx, op, x)?
            }
            "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" => self.reduce(cx)?,
            "ArgMax" | "ArgMin" => {
                cx.check_attrs(&[
                    a("axis", INT),
                    a("keepdims", INT),
                    a("select_last_index", INT),
                ])?;
                if cx.int("select_last_index", 0) != 0 {
                    return Err(cx.err("select_last_index = 1 is not supported"));
                }
                let x = cx.need(0)?;
                let axis = norm_axis(cx, cx.int("axis", 0), self.shape_of(x)?.len())?;
                let op = OpKind::Reduce {
                    op: if cx.op == "ArgMax" {
                        ReduceOp::ArgMax
                    } else {
                        ReduceOp::ArgMin
                    },
                    axes: vec![axis as isize],
                    keepdim: cx.int("keepdims", 1) != 0,
                    correction: 0.0,
                };
                // The indices are f32 values, as every run-time integer in kiln's graph.
                let v = self.emit1(cx, op, x)?;
                self.mark_int(&v);
                v
            }
            "GatherElements" => {
                cx.check_attrs(&[a("axis", INT)])?;
                let (x, idx) = (cx.need(0)?, cx.need(1)?);
                let axis = norm_axis(cx, cx.int("axis", 0), self.shape_of(x)?.len())?;
                if let Val::Host {
                    data: Data::I(v), ..
                } = self.get(idx)?
                {
                    if v.iter().any(|d| d.is_dynamic() || d.fixed < 0) {
                        return Err(cx.err("negative or batch-dependent indices"));
                    }
                }
                let ins = vec![self.upload(x)?, self.upload(idx)?];
                self.emit(
                    cx,
                    OpKind::Gather {
                        axis: axis as isize,
                    },
                    ins,
                )?
            }
            "MatMul" => {
                cx.check_attrs(&[])?;
                let (x, w) = (cx.need(0)?, cx.need(1)?);
                let w2 = matches!(self.vals.get(w), Some(Val::Host { shape, data: Data::F(_) }) if shape.len() == 2);
                match w2 && !self.shape_of(x)?.is_empty() {
                    // x @ W with a constant 2-D W: the linear kernel, reading W^T.
                    true => {
                        let (wt, s) = self
                            .derived_const(w, "transposed".into(), |s, v| {
                                (vec![s[1], s[0]], transpose2(&v, s[0], s[1]))
                            })
                            .ok_or_else(|| cx.err("internal: the weight is not a constant"))??;
                        let s = [s[1], s[0]];
                        let x = self.upload(x)?;
                        let op = OpKind::Linear {
                            bias: false,
                            act: None,
                        };
                        self.emit(cx, op, vec![x, (wt, fixed(&[s[1], s[0]]))])?
                    }
                    false => {
                        let ins = vec![self.upload(x)?, self.upload(w)?];
                        self.emit(cx, OpKind::Matmul, ins)?
                    }
                }
            }
            "Gemm" => self.gemm(cx)?,
            "Conv" => self.conv(cx)?,
            "ConvTranspose" => self.conv_transpose(cx)?,
            "MaxPool" | "AveragePool" => self.pool(cx)?,
            "GlobalAveragePool" => {
                cx.check_attrs(&[])?;
                let x = cx.need(0)?;
                if self.shape_of(x)?.len() != 4 {
                    return Err(cx.err("only 2-D pooling (rank-4 input) is supported"));
                }
                self.emit1(cx, OpKind::AdaptiveAvgPool { size: [1, 1] }, x)?
            }
            "BatchNormalization" => {
                cx.check_attrs(&[
                    a("epsilon", FLOAT),
                    a("momentum", FLOAT),
                    a("training_mode", INT),
                    a("spatial", INT),
                ])?;
                if cx.int("training_mode", 0) != 0 {
                    return Err(cx.err("training_mode = 1 is not supported"));
                }
                if cx.int("spatial", 1) != 1 {
                    return Err(cx.err("spatial = 0 is not supported"));
                }
                let x = self.upload(cx.need(0)?)?;
                let c =
                    x.1.get(1)
                        .copied()
                        .ok_or_else(|| cx.err("input has rank below 2"))?;
                let mut ins = vec![x];
                for k in [3, 4, 1, 2] {
                    let (src, s) = self.upload(cx.need(k)?)?;
                    if s != [c] {
                        return Err(cx.err(format!("input {k} has shape {s:?}, not [{c:?}]")));
                    }
                    ins.push((src, s));
                }
                let op = OpKind::BatchNorm {
                    eps: cx.float("epsilon", 1e-5),
                    weight: true,
                    bias: true,
                };
                self.emit(cx, op, ins)?
            }
            "LayerNormalization" => {
                cx.check_attrs(&[a("axis", INT), a("epsilon", FLOAT), a("stash_type", INT)])?;
                let x = self.upload(cx.need(0)?)?;
                let axis = norm_axis(cx, cx.int("axis", -1), x.1.len())?;
                let shape = x.1[axis..]
                    .iter()
                    .map(|d| {
                        if d.is_dynamic() {
                            Err(cx.err("normalizes over a batch-dependent axis"))
                        } else {
                            Ok(d.fixed as usize)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut ins = vec![x];
                let mut param = |k: usize, ins: &mut Vec<(Src, Vec<Dim>)>| -> Result<bool> {
                    let Some(n) = cx.input(k) else {
                        return Ok(false);
                    };
                    let (src, s) = self.upload(n)?;
                    let want = fixed(&shape);
                    // Scales of the normalized shape with leading ones read as that shape.
                    let same_count = checked_numel(&shape).map(|n| n as i64) == fixed_count(&s);
                    let src = if s != want && same_count {
                        let op = OpKind::Reshape {
                            shape: want.clone(),
                        };
                        match self.emit(cx, op, vec![(src, s)])? {
                            Val::Run { src, .. } => src,
                            Val::Host { .. } => unreachable!("emit makes a node"),
                        }
                    } else {
                        src
                    };
                    ins.push((src, want));
                    Ok(true)
                };
                let weight = param(1, &mut ins)?;
                let bias = param(2, &mut ins)?;
                let op = OpKind::LayerNorm {
                    shape,
                    eps: cx.float("epsilon", 1e-5),
                    weight,
                    bias,
                };
                self.emit(cx, op, ins)?
            }
            other => return Err(cx.err(format!("op {other:?} is not supported"))),
        }])
    }

    fn constant(&mut self, cx: &Ctx) -> Result<Val> {
        cx.check_attrs(&[
            a("value", TENSOR),
            a("value_float", FLOAT),
            a("value_floats", FLOATS),
            a("value_int", INT),
            a("value_ints", INTS),
        ])?;
        let attr = cx
            .node
            .attribute
            .first()
            .filter(|_| cx.node.attribute.len() == 1)
            .ok_or_else(|| cx.err("needs exactly one value attribute"))?;
        Ok(match attr.name() {
            "value" => {
                let t = attr
                    .t
                    .as_ref()
                    .ok_or_else(|| cx.err("value holds no tensor"))?;
                let (shape, data) = tensor_data(t, &format!("node {:?}'s value", cx.name))?;
                Val::Host { shape, data }
            }
            "value_float" => Val::Host {
                shape: vec![],
                data: Data::F(vec![attr.f.unwrap_or(0.0)]),
            },
            "value_floats" => Val::Host {
                shape: vec![attr.floats.len()],
                data: Data::F(attr.floats.clone()),
            },
            "value_int" => Val::Host {
                shape: vec![],
                data: Data::I(vec![int(attr.i.unwrap_or(0))]),
            },
            _ => Val::Host {
                shape: vec![attr.ints.len()],
                data: Data::I(attr.ints.iter().map(|&v| int(v)).collect()),
            },
        })
    }

    /// The shape a Reshape's target gives: 0 copies the input size (unless `allowzero`), one
    /// -1 takes what is left.
    fn reshape_target(
        &self,
        cx: &Ctx,
        input: &[Dim],
        target: &[Dim],
        allowzero: bool,
    ) -> Result<Vec<Dim>> {
        let mut out: Vec<Dim> = Vec::with_capacity(target.len());
        let mut infer = None;
        for (i, &d) in target.iter().enumerate() {
            if d == int(-1) {
                if infer.replace(i).is_some() {
                    return Err(cx.err(format!("shape {target:?} has two -1 sizes")));
                }
                out.push(int(-1));
            } else if d == int(0) && !allowzero {
                out.push(*input.get(i).ok_or_else(|| {
                    cx.err(format!("size 0 at axis {i} copies an axis {input:?} lacks"))
                })?);
            } else if PROBES.iter().any(|&n| ev(d, n) < 0) {
                return Err(cx.err(format!("negative size in shape {target:?}")));
            } else {
                out.push(d);
            }
        }
        if let Some(i) = infer {
            let mut vals = [0i128; 3];
            for (k, n) in PROBES.into_iter().enumerate() {
                let total = checked_product(input.iter().map(|&d| ev(d, n)));
                let rest = checked_product(
                    out.iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, &d)| ev(d, n)),
                );
                let (Some(total), Some(rest)) = (total, rest) else {
                    return Err(cx.err(format!("the sizes of {input:?} or {target:?} overflow")));
                };
                if rest == 0 || total % rest != 0 {
                    return Err(cx.err(format!("cannot view {input:?} as {target:?}")));
                }
                vals[k] = total / rest;
            }
            out[i] = fit(vals).ok_or_else(|| {
                cx.err(format!("the -1 of {target:?} is not linear in the batch"))
            })?;
        }
        Ok(out)
    }

    /// `x` viewed as `shape`: on the host for values known at load.
    fn reshape(&mut self, cx: &Ctx, x: &str, shape: Vec<Dim>) -> Result<Val> {
        match self.get(x)? {
            Val::Host { data, shape: old } => {
                let s = shape
                    .iter()
                    .map(|d| {
                        if d.is_dynamic() || d.fixed < 0 {
                            Err(cx.err(format!("cannot view a constant of {old:?} as {shape:?}")))
                        } else {
                            Ok(d.fixed as usize)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                if checked_numel(&s) != checked_numel(&old) || !host_shape_ok(&s, MAX_HOST) {
                    return Err(cx.err(format!("cannot view {old:?} as {s:?}")));
                }
                Ok(Val::Host { shape: s, data })
            }
            Val::Run { .. } => self.emit1(cx, OpKind::Reshape { shape }, x),
        }
    }

    fn split(&mut self, cx: &Ctx) -> Result<Vec<Val>> {
        cx.check_attrs(&[a("axis", INT), a("split", INTS), a("num_outputs", INT)])?;
        let x = cx.need(0)?;
        let s = self.shape_of(x)?;
        let axis = norm_axis(cx, cx.int("axis", 0), s.len())?;
        let outs = cx.node.output.len();
        let sizes: Vec<Dim> = match cx.input(1) {
            Some(n) => self.host_ints(cx, n)?,
            None => match cx.ints("split") {
                Some(v) => v.into_iter().map(int).collect(),
                None => {
                    let d = s[axis];
                    if d.is_dynamic() || outs == 0 {
                        return Err(cx.err("an even split of a batch-dependent axis"));
                    }
                    let total = d.fixed;
                    let parts = outs as i64;
                    if self.opset < 18 && total % parts != 0 {
                        return Err(cx.err(format!(
                            "{total} does not split evenly into {parts} outputs"
                        )));
                    }
                    let each = total / parts + (total % parts != 0) as i64;
                    (0..parts)
                        .map(|k| int(total.saturating_sub(k.saturating_mul(each)).clamp(0, each)))
                        .collect()
                }
            },
        };
        if sizes.len() != outs {
            return Err(cx.err(format!("{} sizes for {outs} outputs", sizes.len())));
        }
        let mut start = int(0);
        let mut vals = Vec::with_capacity(outs);
        for len in sizes {
            let op = OpKind::Narrow { axis, start, len };
            vals.push(match self.get(x)? {
                Val::Host { .. } => return Err(cx.err("splitting a constant is not supported")),
                Val::Run { .. } => self.emit1(cx, op, x)?,
            });
            start = match (
                start.per_batch.checked_add(len.per_batch),
                start.fixed.checked_add(len.fixed),
            ) {
                (Some(per_batch), Some(fixed)) => Dim { per_batch, fixed },
                _ => return Err(cx.err("split sizes overflow")),
            };
        }
        if start != s[axis] {
            return Err(cx.err(format!(
                "the sizes cover {start:?} of axis size {:?}",
                s[axis]
            )));
        }
        Ok(vals)
    }

    fn slice(&mut self, cx: &Ctx) -> Result<Val> {
        cx.check_attrs(&[a("starts", INTS), a("ends", INTS), a("axes", INTS)])?;
        let x = cx.need(0)?;
        let s = self.shape_of(x)?;
        let (starts, ends, axes, steps) = if self.opset >= 10 {
            let starts = self.host_ints(cx, cx.need(1)?)?;
            let ends = self.host_ints(cx, cx.need(2)?)?;
            let axes = match cx.input(3) {
                Some(n) => self.const_ints(cx, n)?,
                None => (0..starts.len() as i64).collect(),
            };
            let steps = match cx.input(4) {
                Some(n) => self.const_ints(cx, n)?,
                None => vec![1; starts.len()],
            };
            (starts, ends, axes, steps)
        } else {
            let get = |n: &str| cx.ints(n).ok_or_else(|| cx.err(format!("needs {n}")));
            let starts: Vec<Dim> = get("starts")?.into_iter().map(int).collect();
            let ends = get("ends")?.into_iter().map(int).collect();
            let axes = cx
                .ints("axes")
                .unwrap_or_else(|| (0..starts.len() as i64).collect());
            let steps = vec![1; starts.len()];
            (starts, ends, axes, steps)
        };
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Err(cx.err("starts, ends, axes and steps differ in length"));
        }
        if let Some(st) = steps.iter().find(|&&st| st != 1) {
            return Err(cx.err(format!("step {st} is not supported (only 1)")));
        }
        let mut cur = self.get(x)?;
        let mut seen = Vec::new();
        for k in 0..starts.len() {
            let axis = norm_axis(cx, axes[k], s.len())?;
            if seen.contains(&axis) {
                return Err(cx.err(format!("axis {axis} sliced twice")));
            }
            seen.push(axis);
            // ONNX's clamping, resolved for every batch size N >= 1.
            let dim = s[axis];
            let start = slice_bound(cx, starts[k], dim)?;
            let end = slice_bound(cx, ends[k], dim)?;
            let diff = dim_op(cx, BinaryOp::Sub, end, start)?;
            let len = if at_least_zero(diff) {
                diff
            } else if at_most_zero(diff) {
                int(0)
            } else {
                return Err(cx.err(format!(
                    "the slice [{start:?}, {end:?}) is empty for some batch sizes only"
                )));
            };
            cur = match cur {
                Val::Host { shape, data } => {
                    if start.is_dynamic() || len.is_dynamic() {
                        return Err(cx.err("internal: a batch-dependent slice of a constant"));
                    }
                    host_narrow(
                        &shape,
                        &data,
                        axis,
                        start.fixed as usize,
                        len.fixed as usize,
                    )
                }
                Val::Run { src, shape } => {
                    let op = OpKind::Narrow { axis, start, len };
                    self.emit(cx, op, vec![(src, shape)])?
                }
            };
        }
        Ok(cur)
    }

    fn gather(&mut self, cx: &Ctx) -> Result<Val> {
        cx.check_attrs(&[("axis", INT)])?;
        let (x, idx) = (cx.need(0)?, cx.need(1)?);
        let s = self.shape_of(x)?;
        let axis = norm_axis(cx, cx.int("axis", 0), s.len())?;
        let (ishape, ivals) = match self.get(idx)? {
            Val::Host {
                shape,
                data: Data::I(v),
            } => (shape, v),
            Val::Host { .. } => return Err(cx.err("indices must be integers")),
            Val::Run { src, shape } => {
                // Indices computed at run time (token ids): index_select on the flattened
                // indices, which refuses negative or out-of-range ones at run time.
                let count = product(cx, &shape)?;
                let flat = match self.emit(
                    cx,
                    OpKind::Reshape { shape: vec![count] },
                    vec![(src, shape.clone())],
                )? {
                    Val::Run { src, shape } => (src, shape),
                    Val::Host { .. } => return Err(cx.err("internal: reshape made no node")),
                };
                let xs = self.upload(x)?;
                let op = OpKind::IndexSelect {
                    axis: axis as isize,
                };
                let Val::Run { src, shape: picked } = self.emit(cx, op, vec![xs, flat])? else {
                    return Err(cx.err("internal: index_select made no node"));
                };
                let mut out: Vec<Dim> = s[..axis].to_vec();
                out.extend_from_slice(&shape);
                out.extend_from_slice(&s[axis + 1..]);
                return self.emit(cx, OpKind::Reshape { shape: out }, vec![(src, picked)]);
            }
        };
        let dim = s[axis];
        let mut idx: Vec<usize> = Vec::with_capacity(ivals.len());
        for v in &ivals {
            let i = if v.is_dynamic() {
                return Err(cx.err("a batch-dependent index"));
            } else {
                v.fixed
            };
            // Negative indices count from the end; the axis must then be known.
            let resolved = if i < 0 {
                if dim.is_dynamic() {
                    return Err(cx.err("a negative index into a batch-dependent axis"));
                }
                i + dim.fixed
            } else {
                i
            };
            let ok = resolved >= 0 && PROBES.iter().all(|&n| (resolved as i128) < ev(dim, n));
            if !ok {
                return Err(cx.err(format!("index {i} is out of range for axis size {dim:?}")));
            }
            idx.push(resolved as usize);
        }
        let mut out_shape: Vec<Dim> = s[..axis].to_vec();
        out_shape.extend(fixed(&ishape));
        out_shape.extend_from_slice(&s[axis + 1..]);
        if let Val::Host { shape, data } = self.get(x)? {
            return host_gather(cx, &shape, &data, axis, &idx, &ishape);
        }
        let picked = if idx.len() == 1 {
            let op = OpKind::Narrow {
                axis,
                start: Dim::fixed(idx[0]),
                len: Dim::fixed(1),
            };
            self.emit1(cx, op, x)?
        } else {
            // The index kernels read f32 indices (exact to 2^24, checked by the op).
            let v: Vec<f32> = idx.iter().map(|&i| i as f32).collect();
            let t = Tensor::from_slice(&v, &[v.len()], self.device)?;
            let c = self.add_const(t);
            let xs = self.upload(x)?;
            let op = OpKind::IndexSelect {
                axis: axis as isize,
            };
            self.emit(cx, op, vec![xs, (c, fixed(&[v.len()]))])?
        };
        let Val::Run { src, shape } = picked else {
            return Err(cx.err("internal: gather made no node"));
        };
        if shape == out_shape {
            return Ok(Val::Run { src, shape });
        }
        self.emit(cx, OpKind::Reshape { shape: out_shape }, vec![(src, shape)])
    }

    fn binary(&mut self, cx: &Ctx) -> Result<Val> {
        cx.check_attrs(&[])?;
        let op = match cx.op {
            "Add" => BinaryOp::Add,
            "Sub" => BinaryOp::Sub,
            "Mul" => BinaryOp::Mul,
            "Div" => BinaryOp::Div,
            "Pow" => BinaryOp::Pow,
            "Equal" => BinaryOp::Eq,
            "Less" => BinaryOp::Lt,
            "Greater" => BinaryOp::Gt,
            "LessOrEqual" => BinaryOp::Le,
            "GreaterOrEqual" => BinaryOp::Ge,
            "Max" => BinaryOp::Maximum,
            _ => BinaryOp::Minimum,
        };
        let names: Vec<&str> = cx.node.input.iter().map(String::as_str).collect();
        let variadic = matches!(op, BinaryOp::Maximum | BinaryOp::Minimum);
        if names.iter().any(|n| n.is_empty())
            || (variadic && names.is_empty())
            || (!variadic && names.len() != 2)
        {
            return Err(cx.err(format!("takes two inputs, got {names:?}")));
        }
        if names.len() == 1 {
            return self.get(names[0]);
        }
        let mut acc = self.get(names[0])?;
        for (k, n) in names.iter().enumerate().skip(1) {
            let b = self.get(n)?;
            acc = match (&acc, &b) {
                (Val::Host { shape: sa, .. }, Val::Host { shape: sb, .. })
                    if small_broadcast(&[sa, sb]) =>
                {
                    host_binary(cx, op, &acc, &b)?
                }
                _ => {
                    // A one-element constant on the left, known on the host.
                    let left = if k == 1 {
                        self.const_scalar(names[0])
                    } else {
                        None
                    };
                    let first = if k == 1 {
                        self.upload(names[0])?
                    } else {
                        match acc {
                            Val::Run { src, shape } => (src, shape),
                            Val::Host { .. } => self.upload_val(&acc)?,
                        }
                    };
                    self.binary_run(cx, op, first, left, n)?
                }
            };
        }
        Ok(acc)
    }

    /// A host value with no name (an intermediate of a variadic op) as a constant.
    fn upload_val(&mut self, v: &Val) -> Result<(Src, Vec<Dim>)> {
        let name = format!("\0anon{}", self.g.consts.len());
        self.vals.insert(name.clone(), v.clone());
        self.upload(&name)
    }

    /// `a op b` with a run-time operand: a one-element constant of no higher rank than the
    /// other side becomes the kernel's scalar.
    fn binary_run(
        &mut self,
        cx: &Ctx,
        op: BinaryOp,
        a: (Src, Vec<Dim>),
        a_scalar: Option<f32>,
        b: &str,
    ) -> Result<Val> {
        let b_int = match self.vals.get(b) {
            Some(Val::Host { data, .. }) => matches!(data, Data::I(_)),
            Some(Val::Run { src, .. }) => self.ints.contains(src),
            None => false,
        };
        let a_int = self.ints.contains(&a.0)
            || matches!(a.0, Src::Const(k) if self.int_consts.contains(&k));
        let ints = a_int && b_int;
        let b_shape = self.shape_of(b)?;
        if let Some(s) = self.const_scalar(b) {
            if b_shape.len() <= a.1.len() {
                let op2 = OpKind::BinaryScalar {
                    op,
                    scalar: s,
                    left: false,
                };
                let y = self.emit(cx, op2, vec![a])?;
                return self.int_result(cx, op, ints, y);
            }
        }
        if let Some(s) = a_scalar {
            // The constant on the left: a scalar kernel with the scalar first.
            if a.1.len() <= b_shape.len() && matches!(self.vals.get(b), Some(Val::Run { .. })) {
                let op2 = OpKind::BinaryScalar {
                    op,
                    scalar: s,
                    left: true,
                };
                let y = self.emit1(cx, op2, b)?;
                return self.int_result(cx, op, ints, y);
            }
        }
        let b = self.upload(b)?;
        let y = self.emit(cx, OpKind::Binary { op }, vec![a, b])?;
        self.int_result(cx, op, ints, y)
    }

    /// The result of `op` on two integer operands: integer (division truncates toward zero,
    /// as ONNX's integer division does).
    fn int_result(&mut self, cx: &Ctx, op: BinaryOp, ints: bool, y: Val) -> Result<Val> {
        if !ints
            || !matches!(
                op,
                BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div
            )
        {
            return Ok(y);
        }
        let y = if op == BinaryOp::Div {
            let Val::Run { src, shape } = y else {
                return Ok(y);
            };
            let t = OpKind::Unary {
                op: UnaryOp::Trunc,
                alpha: 0.0,
                beta: 0.0,
            };
            self.emit(cx, t, vec![(src, shape)])?
        } else {
            y
        };
        self.mark_int(&y);
        Ok(y)
    }

    fn reduce(&mut self, cx: &Ctx) -> Result<Val> {
        cx.check_attrs(&[
            a("axes", INTS),
            a("keepdims", INT),
            a("noop_with_empty_axes", INT),
        ])?;
        let x = cx.need(0)?;
        let rank = self.shape_of(x)?.len();
        let axes = match cx.input(1) {
            Some(n) => self.const_ints(cx, n)?,
            None => cx.ints("axes").unwrap_or_default(),
        };
        if axes.is_empty() && cx.int("noop_with_empty_axes", 0) != 0 {
            return self.get(x);
        }
        let axes = axes
            .iter()
            .map(|&v| norm_axis(cx, v, rank).map(|a| a as isize))
            .collect::<Result<Vec<_>>>()?;
        let op = match cx.op {
            "ReduceMean" => ReduceOp::Mean,
            "ReduceSum" => ReduceOp::Sum,
            "ReduceMax" => ReduceOp::Max,
            _ => ReduceOp::Min,
        };
        let op = OpKind::Reduce {
            op,
            axes,
            keepdim: cx.int("keepdims", 1) != 0,
            correction: 0.0,
        };
        self.emit1(cx, op, x)
    }

    fn gemm(&mut self, cx: &Ctx) -> Result<Val> {
        cx.check_attrs(&[
            a("alpha", FLOAT),
            a("beta", FLOAT),
            a("transA", INT),
            a("transB", INT),
        ])?;
        let (alpha, beta) = (cx.float("alpha", 1.0), cx.float("beta", 1.0));
        let (ta, tb) = (cx.int("transA", 0) != 0, cx.int("transB", 0) != 0);
        let (an, bn) = (cx.need(0)?, cx.need(1)?);
        let mut x = self.upload(an)?;
        if x.1.len() != 2 {
            return Err(cx.err(format!("A must be 2-D, got {:?}", x.1)));
        }
        if ta {
            x = match self.emit(cx, OpKind::Permute { perm: vec![1, 0] }, vec![x])? {
                Val::Run { src, shape } => (src, shape),
                Val::Host { .. } => return Err(cx.err("internal: transpose made no node")),
            };
        }
        let bias = match cx.input(2) {
            Some(c) => {
                let (shape, mut v) = self
                    .const_floats(c)
                    .ok_or_else(|| cx.err("C must be a constant (known at load time)"))?;
                v.iter_mut().for_each(|e| *e *= beta);
                Some((shape, v))
            }
            None => None,
        };
        match self.vals.get(bn) {
            Some(Val::Host {
                shape,
                data: Data::F(_),
            }) if shape.len() == 2 => {}
            _ => return Err(cx.err("B must be a 2-D float constant (known at load time)")),
        }
        // The linear kernel reads W as (out, in), alpha folded in.
        let (wsrc, ws) = self
            .derived_const(bn, format!("gemm {tb} {alpha}"), |s, v| {
                let mut w = if tb { v } else { transpose2(&v, s[0], s[1]) };
                if alpha != 1.0 {
                    w.iter_mut().for_each(|e| *e *= alpha);
                }
                let shape = if tb { s } else { vec![s[1], s[0]] };
                (shape, w)
            })
            .ok_or_else(|| cx.err("internal: B is not a constant"))??;
        let (out, inp) = (ws[0], ws[1]);
        let mut ins = vec![x, (wsrc, fixed(&[out, inp]))];
        let mut extra_bias = None;
        if let Some((shape, v)) = bias {
            if v.len() == out && (shape == [out] || shape == [1, out]) {
                let b = self.add_const(Tensor::from_slice(&v, &[out], self.device)?);
                ins.push((b, fixed(&[out])));
            } else {
                extra_bias = Some((shape, v));
            }
        }
        let has_bias = ins.len() == 3;
        let y = self.emit(
            cx,
            OpKind::Linear {
                bias: has_bias,
                act: None,
            },
            ins,
        )?;
        match (extra_bias, y) {
            (None, y) => Ok(y),
            (Some((shape, v)), Val::Run { src, shape: ys }) => {
                let c = self.add_const(Tensor::from_slice(&v, &shape, self.device)?);
                let op = OpKind::Binary { op: BinaryOp::Add };
                self.emit(cx, op, vec![(src, ys), (c, fixed(&shape))])
            }
            (Some(_), Val::Host { .. }) => Err(cx.err("internal: gemm made no node")),
        }
    }

    /// `kernel_shape`, `strides`, `pads` (symmetric only), `dilations` of a 2-D conv or pool.
    fn window(&self, cx: &Ctx, kernel: Option<[usize; 2]>) -> Result<Window> {
        if let Some(p) = cx.string("auto_pad") {
            if p != "NOTSET" && p != "VALID" {
                return Err(cx.err(format!("auto_pad = {p:?} is not supported")));
            }
        }
        let pair = |name: &str, default: usize| -> Result<[usize; 2]> {
            match cx.ints(name) {
                None => Ok([default; 2]),
                Some(v) if v.len() == 2 && v.iter().all(|&e| e >= 0 && e <= u32::MAX as i64) => {
                    Ok([v[0] as usize, v[1] as usize])
                }
                Some(v) => Err(cx.err(format!("{name} = {v:?}: two sizes of a 2-D window"))),
            }
        };
        let kernel = match (cx.ints("kernel_shape"), kernel) {
            (Some(_), _) => {
                let k = pair("kernel_shape", 1)?;
                if let Some(w) = kernel {
                    if w != k {
                        return Err(cx.err(format!("kernel_shape {k:?}, weight has {w:?}")));
                    }
                }
                k
            }
            (None, Some(w)) => w,
            (None, None) => return Err(cx.err("needs kernel_shape")),
        };
        let valid = cx.string("auto_pad").as_deref() == Some("VALID");
        let pads = match cx.ints("pads") {
            _ if valid => [0, 0],
            None => [0, 0],
            Some(p) if p.len() == 4 && p.iter().all(|&e| e >= 0 && e <= u32::MAX as i64) => {
                if p[0] != p[2] || p[1] != p[3] {
                    return Err(cx.err(format!(
                        "asymmetric pads {p:?} are not supported (begin must equal end)"
                    )));
                }
                [p[0] as usize, p[1] as usize]
            }
            Some(p) => return Err(cx.err(format!("pads = {p:?}: four sizes of a 2-D window"))),
        };
        Ok(Window {
            kernel,
            stride: pair("strides", 1)?,
            pads,
            dilation: pair("dilations", 1)?,
        })
    }

    /// The operands (x, w, and b when given) and window of a 2-D convolution or transposed
    /// convolution; `extra` are attributes beyond the common ones.
    #[allow(clippy::type_complexity)]
    fn conv_operands(
        &mut self,
        cx: &Ctx,
        extra: &[(&'static str, i32)],
    ) -> Result<(Vec<(Src, Vec<Dim>)>, Window, usize)> {
        let mut known = vec![
            a("kernel_shape", INTS),
            a("strides", INTS),
            a("pads", INTS),
            a("dilations", INTS),
            a("group", INT),
            a("auto_pad", STRING),
        ];
        known.extend_from_slice(extra);
        cx.check_attrs(&known)?;
        let x = self.upload(cx.need(0)?)?;
        let w = self.upload(cx.need(1)?)?;
        if x.1.len() != 4 || w.1.len() != 4 {
            return Err(cx.err(format!(
                "only 2-D convolution is supported (input {:?}, weight {:?})",
                x.1, w.1
            )));
        }
        let kw = [w.1[2], w.1[3]].map(|d| d.fixed.max(0) as usize);
        let win = self.window(cx, Some(kw))?;
        let groups = usize::try_from(cx.int("group", 1)).map_err(|_| cx.err("group < 0"))?;
        let mut ins = vec![x, w];
        if let Some(b) = cx.input(2) {
            ins.push(self.upload(b)?);
        }
        Ok((ins, win, groups))
    }

    fn conv(&mut self, cx: &Ctx) -> Result<Val> {
        let (ins, win, groups) = self.conv_operands(cx, &[])?;
        let opts = Conv2dOptions {
            stride: win.stride,
            padding: win.pads,
            dilation: win.dilation,
            groups,
        };
        let op = OpKind::Conv2d {
            opts,
            bias: ins.len() == 3,
            act: None,
        };
        self.emit(cx, op, ins)
    }

    fn conv_transpose(&mut self, cx: &Ctx) -> Result<Val> {
        let (ins, win, groups) = self.conv_operands(cx, &[a("output_padding", INTS)])?;
        let output_padding = match cx.ints("output_padding") {
            None => [0, 0],
            Some(v) if v.len() == 2 && v.iter().all(|&e| (0..=u32::MAX as i64).contains(&e)) => {
                [v[0] as usize, v[1] as usize]
            }
            Some(v) => return Err(cx.err(format!("output_padding = {v:?}"))),
        };
        let opts = ConvTranspose2dOptions {
            stride: win.stride,
            padding: win.pads,
            output_padding,
            dilation: win.dilation,
            groups,
        };
        let op = OpKind::ConvTranspose2d {
            opts,
            bias: ins.len() == 3,
        };
        self.emit(cx, op, ins)
    }

    fn pool(&mut self, cx: &Ctx) -> Result<Val> {
        let max = cx.op == "MaxPool";
        cx.check_attrs(&[
            a("kernel_shape", INTS),
            a("strides", INTS),
            a("pads", INTS),
            a("dilations", INTS),
            a("auto_pad", STRING),
            a("ceil_mode", INT),
            a("count_include_pad", INT),
            a("storage_order", INT),
        ])?;
        if cx.int("ceil_mode", 0) != 0 {
            return Err(cx.err("ceil_mode = 1 is not supported"));
        }
        if cx.int("storage_order", 0) != 0 {
            return Err(cx.err("storage_order = 1 is not supported"));
        }
        let x = cx.need(0)?;
        if self.shape_of(x)?.len() != 4 {
            return Err(cx.err("only 2-D pooling (rank-4 input) is supported"));
        }
        let win = self.window(cx, None)?;
        if !max && win.dilation != [1, 1] {
            return Err(cx.err("dilated average pooling is not supported"));
        }
        let opts = Pool2dOptions {
            kernel: win.kernel,
            stride: win.stride,
            padding: win.pads,
            dilation: win.dilation,
            count_include_pad: cx.int("count_include_pad", 0) != 0,
        };
        self.emit1(cx, OpKind::Pool { opts, max }, x)
    }
}

struct Window {
    kernel: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 2],
    dilation: [usize; 2],
}

fn norm_axis(cx: &Ctx, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(cx.err(format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// The product of sizes, linear in the batch when at most one depends on it.
fn product(cx: &Ctx, dims: &[Dim]) -> Result<Dim> {
    let vals = PROBES.map(|n| checked_product(dims.iter().map(|&d| ev(d, n))));
    let [Some(a), Some(b), Some(c)] = vals else {
        return Err(cx.err(format!("the product of {dims:?} overflows")));
    };
    fit([a, b, c]).ok_or_else(|| {
        cx.err(format!(
            "the product of {dims:?} is not linear in the batch"
        ))
    })
}

/// The element count of a shape that does not depend on the batch.
fn fixed_count(dims: &[Dim]) -> Option<i64> {
    dims.iter().try_fold(1i64, |acc, d| {
        if d.is_dynamic() {
            None
        } else {
            acc.checked_mul(d.fixed)
        }
    })
}

fn transpose2(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Picks elements of host data by a map from output positions to input positions.
fn pick(data: &Data, idx: impl Iterator<Item = usize>) -> Data {
    match data {
        Data::F(v) => Data::F(idx.map(|i| v[i]).collect()),
        Data::I(v) => Data::I(idx.map(|i| v[i]).collect()),
    }
}

fn host_transpose(cx: &Ctx, shape: &[usize], data: &Data, perm: &[usize]) -> Result<Val> {
    let mut seen = vec![false; shape.len()];
    if perm.len() != shape.len()
        || perm
            .iter()
            .any(|&p| p >= shape.len() || std::mem::replace(&mut seen[p], true))
    {
        return Err(cx.err(format!(
            "{perm:?} is not a permutation of rank {}",
            shape.len()
        )));
    }
    let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let (is, os) = (strides_of(shape), strides_of(&out));
    let n = checked_numel(&out).unwrap_or(0);
    let idx = (0..n).map(|o| {
        let mut rem = o;
        let mut i = 0;
        for (d, &st) in os.iter().enumerate() {
            let c = rem / st;
            rem %= st;
            i += c * is[perm[d]];
        }
        i
    });
    Ok(Val::Host {
        data: pick(data, idx),
        shape: out,
    })
}

fn host_narrow(shape: &[usize], data: &Data, axis: usize, start: usize, len: usize) -> Val {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let dim = shape[axis];
    let idx = (0..outer).flat_map(move |o| {
        (start..start + len).flat_map(move |a| (0..inner).map(move |i| (o * dim + a) * inner + i))
    });
    let mut s = shape.to_vec();
    s[axis] = len;
    Val::Host {
        data: pick(data, idx),
        shape: s,
    }
}

fn host_gather(
    cx: &Ctx,
    shape: &[usize],
    data: &Data,
    axis: usize,
    idx: &[usize],
    ishape: &[usize],
) -> Result<Val> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let dim = shape[axis];
    let mut out_shape = shape[..axis].to_vec();
    out_shape.extend_from_slice(ishape);
    out_shape.extend_from_slice(&shape[axis + 1..]);
    if checked_numel(&out_shape).is_none_or(|n| n > MAX_COMPUTED) {
        return Err(cx.err(format!("output {out_shape:?} is too large")));
    }
    let positions = (0..outer).flat_map(|o| {
        idx.iter()
            .flat_map(move |&a| (0..inner).map(move |i| (o * dim + a) * inner + i))
    });
    Ok(Val::Host {
        data: pick(data, positions),
        shape: out_shape,
    })
}

fn host_concat(cx: &Ctx, vals: &[Val], axis: i64) -> Result<Val> {
    let parts: Vec<(&Vec<usize>, &Vec<Dim>)> = vals
        .iter()
        .map(|v| match v {
            Val::Host {
                shape,
                data: Data::I(d),
            } => Ok((shape, d)),
            _ => Err(cx.err("internal: host concat of a non-integer value")),
        })
        .collect::<Result<_>>()?;
    let rank = parts[0].0.len();
    let ax = norm_axis(cx, axis, rank)?;
    let mut out_shape = parts[0].0.clone();
    out_shape[ax] = 0;
    for (s, _) in &parts {
        if s.len() != rank
            || s.iter()
                .enumerate()
                .any(|(i, &d)| i != ax && d != parts[0].0[i])
        {
            return Err(cx.err(format!(
                "shapes {:?} and {s:?} differ off axis {ax}",
                parts[0].0
            )));
        }
        out_shape[ax] = out_shape[ax].saturating_add(s[ax]);
    }
    if !host_shape_ok(&out_shape, MAX_COMPUTED) {
        return Err(cx.err(format!("{out_shape:?} is too large to compute at load")));
    }
    let outer: usize = out_shape[..ax].iter().product();
    let mut out = Vec::new();
    for o in 0..outer {
        for (s, d) in &parts {
            let chunk: usize = s[ax..].iter().product();
            out.extend_from_slice(&d[o * chunk..(o + 1) * chunk]);
        }
    }
    Ok(Val::Host {
        shape: out_shape,
        data: Data::I(out),
    })
}

/// True when host shapes broadcast to at most [`MAX_COMPUTED`] elements (larger results are
/// computed on the GPU).
fn small_broadcast(shapes: &[&[usize]]) -> bool {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        match broadcast_shapes(OP, &out, s) {
            Ok(b) => out = b,
            Err(_) => return true, // the host op reports the mismatch
        }
    }
    checked_numel(&out).is_some_and(|n| n <= MAX_COMPUTED)
}

/// For each output element of the broadcast shape, the element of each operand it reads.
fn broadcast_index(cx: &Ctx, shapes: &[&[usize]]) -> Result<(Vec<usize>, Vec<Vec<usize>>)> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        out = broadcast_shapes(OP, &out, s).map_err(|e| cx.err(e))?;
    }
    let n = checked_numel(&out)
        .filter(|&n| n <= MAX_COMPUTED)
        .ok_or_else(|| cx.err(format!("{out:?} is too large to compute at load")))?;
    let os = strides_of(&out);
    let maps = shapes
        .iter()
        .map(|s| {
            let st = strides_of(s);
            let off = out.len() - s.len();
            (0..n)
                .map(|o| {
                    let mut i = 0;
                    for d in 0..s.len() {
                        let c = (o / os[d + off]) % out[d + off];
                        if s[d] != 1 {
                            i += c * st[d];
                        }
                    }
                    i
                })
                .collect()
        })
        .collect();
    Ok((out, maps))
}

fn host_binary(cx: &Ctx, op: BinaryOp, a: &Val, b: &Val) -> Result<Val> {
    let (
        Val::Host {
            shape: sa,
            data: da,
        },
        Val::Host {
            shape: sb,
            data: db,
        },
    ) = (a, b)
    else {
        return Err(cx.err("internal: host op on a run-time value"));
    };
    let (shape, maps) = broadcast_index(cx, &[sa, sb])?;
    let data = match (da, db) {
        (Data::I(x), Data::I(y)) => {
            let mut v = Vec::with_capacity(maps[0].len());
            for (&i, &j) in maps[0].iter().zip(&maps[1]) {
                v.push(dim_op(cx, op, x[i], y[j])?);
            }
            Data::I(v)
        }
        _ => {
            let f = |d: &Data, i: usize| -> Result<f32> {
                match d {
                    Data::F(v) => Ok(v[i]),
                    Data::I(v) if !v[i].is_dynamic() => Ok(v[i].fixed as f32),
                    Data::I(_) => Err(cx.err("a batch-dependent size in float arithmetic")),
                }
            };
            let cmp = matches!(
                op,
                BinaryOp::Eq | BinaryOp::Lt | BinaryOp::Gt | BinaryOp::Le | BinaryOp::Ge
            );
            let mut fv = Vec::new();
            let mut iv = Vec::new();
            for (&i, &j) in maps[0].iter().zip(&maps[1]) {
                let (x, y) = (f(da, i)?, f(db, j)?);
                let r = match op {
                    BinaryOp::Add => x + y,
                    BinaryOp::Sub => x - y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Div => x / y,
                    BinaryOp::Pow => x.powf(y),
                    BinaryOp::Maximum => x.max(y),
                    BinaryOp::Minimum => x.min(y),
                    BinaryOp::Eq => (x == y) as i32 as f32,
                    BinaryOp::Ne => (x != y) as i32 as f32,
                    BinaryOp::Lt => (x < y) as i32 as f32,
                    BinaryOp::Le => (x <= y) as i32 as f32,
                    BinaryOp::Gt => (x > y) as i32 as f32,
                    BinaryOp::Ge => (x >= y) as i32 as f32,
                };
                if cmp {
                    iv.push(int(r as i64));
                } else {
                    fv.push(r);
                }
            }
            if cmp {
                Data::I(iv)
            } else {
                Data::F(fv)
            }
        }
    };
    Ok(Val::Host { shape, data })
}

/// Integer arithmetic on sizes that may depend on the batch.
fn dim_op(cx: &Ctx, op: BinaryOp, a: Dim, b: Dim) -> Result<Dim> {
    let nonlinear = || cx.err(format!("{a:?} {op:?} {b:?} is not linear in the batch"));
    let add = |x: i64, y: i64| x.checked_add(y).ok_or_else(|| cx.err("integer overflow"));
    let mul = |x: i64, y: i64| x.checked_mul(y).ok_or_else(|| cx.err("integer overflow"));
    let flag = |v: bool| Ok(int(v as i64));
    let known = |a: Dim, b: Dim| !a.is_dynamic() && !b.is_dynamic();
    match op {
        BinaryOp::Add => Ok(Dim {
            per_batch: add(a.per_batch, b.per_batch)?,
            fixed: add(a.fixed, b.fixed)?,
        }),
        BinaryOp::Sub => {
            let sub = |x: i64, y: i64| x.checked_sub(y).ok_or_else(|| cx.err("integer overflow"));
            Ok(Dim {
                per_batch: sub(a.per_batch, b.per_batch)?,
                fixed: sub(a.fixed, b.fixed)?,
            })
        }
        BinaryOp::Mul => {
            let (d, k) = match (a.is_dynamic(), b.is_dynamic()) {
                (_, false) => (a, b.fixed),
                (false, true) => (b, a.fixed),
                _ => return Err(nonlinear()),
            };
            Ok(Dim {
                per_batch: mul(d.per_batch, k)?,
                fixed: mul(d.fixed, k)?,
            })
        }
        BinaryOp::Div => {
            if b.is_dynamic() || b.fixed == 0 {
                return Err(cx.err(format!("division of {a:?} by {b:?}")));
            }
            let k = b.fixed;
            let overflow = || cx.err("integer overflow");
            if a.per_batch.checked_rem(k).ok_or_else(overflow)? != 0 {
                return Err(nonlinear());
            }
            // Integer division truncates toward zero, as ONNX's does.
            if a.is_dynamic() && a.fixed.checked_rem(k).ok_or_else(overflow)? != 0 {
                return Err(nonlinear());
            }
            Ok(Dim {
                per_batch: a.per_batch.checked_div(k).ok_or_else(overflow)?,
                fixed: a.fixed.checked_div(k).ok_or_else(overflow)?,
            })
        }
        BinaryOp::Eq => flag(always_eq(cx, a, b)?),
        BinaryOp::Ne => flag(!always_eq(cx, a, b)?),
        _ if known(a, b) => match op {
            BinaryOp::Lt => flag(a.fixed < b.fixed),
            BinaryOp::Le => flag(a.fixed <= b.fixed),
            BinaryOp::Gt => flag(a.fixed > b.fixed),
            BinaryOp::Ge => flag(a.fixed >= b.fixed),
            BinaryOp::Maximum => Ok(int(a.fixed.max(b.fixed))),
            BinaryOp::Minimum => Ok(int(a.fixed.min(b.fixed))),
            _ => Err(cx.err(format!("{op:?} of integers is not supported"))),
        },
        _ => Err(nonlinear()),
    }
}

/// `x` where the condition holds, else `y`, over broadcast index maps (condition, x, y).
fn choose<T: Copy>(truth: &[bool], maps: &[Vec<usize>], x: &[T], y: &[T]) -> Vec<T> {
    (0..maps[0].len())
        .map(|o| {
            if truth[maps[0][o]] {
                x[maps[1][o]]
            } else {
                y[maps[2][o]]
            }
        })
        .collect()
}

fn host_where(cx: &Ctx, vals: &[Val]) -> Result<Val> {
    let parts: Vec<(&Vec<usize>, &Data)> = vals
        .iter()
        .map(|v| match v {
            Val::Host { shape, data } => Ok((shape, data)),
            Val::Run { .. } => Err(cx.err("internal: host where of a run-time value")),
        })
        .collect::<Result<_>>()?;
    let shapes: Vec<&[usize]> = parts.iter().map(|(s, _)| s.as_slice()).collect();
    let (shape, maps) = broadcast_index(cx, &shapes)?;
    let truth: Vec<bool> = match parts[0].1 {
        Data::F(v) => v.iter().map(|&f| f != 0.0).collect(),
        Data::I(v) => v.iter().map(|&d| nonzero(cx, d)).collect::<Result<_>>()?,
    };
    let data = match (parts[1].1, parts[2].1) {
        (Data::I(x), Data::I(y)) => Data::I(choose(&truth, &maps, x, y)),
        (Data::F(x), Data::F(y)) => Data::F(choose(&truth, &maps, x, y)),
        _ => return Err(cx.err("branches of different element types")),
    };
    Ok(Val::Host { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cx<R>(f: impl FnOnce(&Ctx) -> R) -> R {
        let node = pb::NodeProto::default();
        f(&Ctx {
            node: &node,
            name: "n".into(),
            op: "Test",
        })
    }

    const N: Dim = Dim {
        per_batch: 1,
        fixed: 0,
    };

    #[test]
    fn size_arithmetic_is_linear_in_the_batch_and_checked() {
        with_cx(|cx| {
            let two_n = dim_op(cx, BinaryOp::Mul, N, int(2)).unwrap();
            assert_eq!(
                two_n,
                Dim {
                    per_batch: 2,
                    fixed: 0
                }
            );
            let n_plus = dim_op(cx, BinaryOp::Add, two_n, int(6)).unwrap();
            assert_eq!(
                dim_op(cx, BinaryOp::Div, n_plus, int(2)).unwrap(),
                Dim {
                    per_batch: 1,
                    fixed: 3
                }
            );
            // N * N, (2N + 1) / 2 and division by zero are not linear sizes.
            assert!(dim_op(cx, BinaryOp::Mul, N, N).is_err());
            assert!(dim_op(
                cx,
                BinaryOp::Div,
                Dim {
                    per_batch: 2,
                    fixed: 1
                },
                int(2)
            )
            .is_err());
            assert!(dim_op(cx, BinaryOp::Div, int(4), int(0)).is_err());
            // Overflow is an Err, never a panic or a wrapped value.
            assert!(dim_op(cx, BinaryOp::Div, int(i64::MIN), int(-1)).is_err());
            assert!(dim_op(cx, BinaryOp::Sub, int(0), int(i64::MIN)).is_err());
            assert!(dim_op(cx, BinaryOp::Mul, int(i64::MAX), int(2)).is_err());
            assert!(dim_op(cx, BinaryOp::Add, int(i64::MAX), int(1)).is_err());
            assert_eq!(dim_op(cx, BinaryOp::Eq, N, N).unwrap(), int(1));
            assert!(norm_axis(cx, 0, 0).is_err() && norm_axis(cx, -1, 3).unwrap() == 2);
        });
    }

    #[test]
    fn slice_bounds_clamp_for_every_batch_size() {
        with_cx(|cx| {
            let two_n = Dim {
                per_batch: 2,
                fixed: 0,
            };
            // To the end, from the end, and the usual INT64 extremes.
            assert_eq!(slice_bound(cx, int(i64::MAX), N).unwrap(), N);
            assert_eq!(slice_bound(cx, int(i64::MIN), N).unwrap(), int(0));
            assert_eq!(
                slice_bound(cx, int(-1), two_n).unwrap(),
                Dim {
                    per_batch: 2,
                    fixed: -1
                }
            );
            assert_eq!(slice_bound(cx, int(1), two_n).unwrap(), int(1));
            // A fixed end of 100 on an axis of N rows: 100 for large batches, N for small.
            assert!(slice_bound(cx, int(100), N).is_err());
            assert!(slice_bound(cx, int(-3), N).is_err());
            assert_eq!(
                slice_bound(cx, int(7), Dim::fixed(5)).unwrap(),
                Dim::fixed(5)
            );
            assert_eq!(slice_bound(cx, int(-9), Dim::fixed(5)).unwrap(), int(0));
            // Sizes equal at some batch sizes only are refused, not guessed.
            assert!(always_eq(cx, N, Dim::fixed(1)).is_err());
            assert!(!always_eq(cx, two_n, Dim::fixed(1)).unwrap());
            assert!(always_eq(cx, N, N).unwrap());
            assert!(dim_op(cx, BinaryOp::Eq, N, Dim::fixed(3)).is_err());
        });
    }

    #[test]
    fn reshape_targets_resolve_zero_and_minus_one() {
        with_cx(|cx| {
            let im = Importer {
                device: &crate::Device::default_device().unwrap(),
                g: Graph {
                    inputs: vec![],
                    consts: vec![],
                    const_dtypes: vec![],
                    nodes: vec![],
                    outputs: vec![],
                },
                vals: HashMap::new(),
                uploaded: HashMap::new(),
                opset: 17,
                host_elems: 0,
                host_budget: 0,
                ints: Default::default(),
                int_consts: Default::default(),
                weights: HashMap::new(),
            };
            let input = [N, Dim::fixed(6), Dim::fixed(4)];
            // [0, -1]: the batch copied, the rest inferred.
            let s = im
                .reshape_target(cx, &input, &[int(0), int(-1)], false)
                .unwrap();
            assert_eq!(s, vec![N, Dim::fixed(24)]);
            // [-1, 8]: a size that is 3N.
            let s = im
                .reshape_target(cx, &input, &[int(-1), int(8)], false)
                .unwrap();
            assert_eq!(
                s,
                vec![
                    Dim {
                        per_batch: 3,
                        fixed: 0
                    },
                    Dim::fixed(8)
                ]
            );
            // Two -1, a size that does not divide, negative sizes, overflowing products.
            assert!(im
                .reshape_target(cx, &input, &[int(-1), int(-1)], false)
                .is_err());
            assert!(im
                .reshape_target(cx, &input, &[int(-1), int(7)], false)
                .is_err());
            assert!(im
                .reshape_target(cx, &input, &[int(-2), int(12)], false)
                .is_err());
            let huge = [Dim::fixed(u32::MAX as usize); 5];
            assert!(im
                .reshape_target(cx, &huge, &[int(-1), int(3)], false)
                .is_err());
        });
    }
}
