//! kiln → ONNX: each node of the frozen graph as standard ONNX ops (opset 17). Fused nodes
//! are written unfused (a conv with its bias, then its activation), and ops ONNX lacks are
//! written as the ops they are made of (exact GELU as `x * 0.5 * (1 + erf(x / sqrt 2))`).

use super::import::elem;
use super::proto as pb;
use super::ONNX_OPSET;
use crate::error::{Error, Result};
use crate::infer::graph::{Act, DType, Dim, Graph, OpKind, Src};
use crate::ops::elementwise::{BinaryOp, UnaryOp};
use crate::ops::reduce::ReduceOp;

pub(super) const OP: &str = "export_onnx";

/// The IR version of files with opset 17.
const IR_VERSION: i64 = 8;

struct Ex<'a> {
    g: &'a Graph,
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    fresh: usize,
    node_idx: usize,
    /// The batch size as a 1-element int64 tensor, once made.
    batch: Option<String>,
}

fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(2),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(7),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(1),
        f: Some(v),
        ..Default::default()
    }
}

fn pair(v: [usize; 2]) -> Vec<i64> {
    vec![v[0] as i64, v[1] as i64]
}

fn onnx_type(d: DType) -> i32 {
    match d {
        DType::F16 => elem::FLOAT16,
        DType::I32 => elem::INT32,
        _ => elem::FLOAT,
    }
}

fn value_info(name: &str, dims: &[Dim], d: DType) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as V, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(if !d.is_dynamic() {
                V::DimValue(d.fixed)
            } else if d.per_batch == 1 && d.fixed == 0 {
                V::DimParam("N".into())
            } else {
                V::DimParam(format!("{}*N+{}", d.per_batch, d.fixed))
            }),
            denotation: None,
        })
        .collect();
    pb::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: Some(onnx_type(d)),
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

/// Builds the ONNX model of a frozen graph.
pub(super) fn export(g: &Graph) -> Result<pb::ModelProto> {
    let mut ex = Ex {
        g,
        nodes: Vec::new(),
        inits: Vec::new(),
        fresh: 0,
        node_idx: 0,
        batch: None,
    };
    for (k, t) in g.consts.iter().enumerate() {
        let dims: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let (data_type, raw) = match g.const_dtypes[k] {
            DType::F32 => (
                elem::FLOAT,
                bytemuck::cast_slice::<f32, u8>(&t.to_vec()?).to_vec(),
            ),
            DType::I32 => (
                elem::INT32,
                bytemuck::cast_slice::<i32, u8>(&t.to_vec_i32()?).to_vec(),
            ),
            DType::F16 => {
                let mut b = t.contiguous()?.read_words(t.numel().div_ceil(2))?;
                b.truncate(t.numel() * 2);
                (elem::FLOAT16, b)
            }
        };
        ex.inits.push(pb::TensorProto {
            name: Some(format!("c{k}")),
            dims,
            data_type: Some(data_type),
            raw_data: Some(raw),
            ..Default::default()
        });
    }
    for i in 0..g.nodes.len() {
        ex.node_idx = i;
        ex.node(i)?;
    }
    let single = g.outputs.len() == 1;
    let mut outputs = Vec::new();
    for (k, &s) in g.outputs.iter().enumerate() {
        let name = if single {
            "output".to_string()
        } else {
            format!("output{k}")
        };
        let src = ex.name(s);
        ex.emit_to("Identity", vec![src], vec![], name.clone());
        outputs.push(value_info(&name, &ex.dims(s), ex.dtype(s)));
    }
    // Weights that only a rewritten node read (a linear's, written transposed) are left out.
    let read: std::collections::HashSet<&String> = ex.nodes.iter().flat_map(|n| &n.input).collect();
    let inits: Vec<pb::TensorProto> = std::mem::take(&mut ex.inits)
        .into_iter()
        .filter(|t| t.name.as_ref().is_some_and(|n| read.contains(n)))
        .collect();
    let inputs = g
        .inputs
        .iter()
        .enumerate()
        .map(|(k, spec)| value_info(&input_name(g, k), &spec.shape, DType::F32))
        .collect();
    Ok(pb::ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(ONNX_OPSET),
        }],
        producer_name: Some("kiln".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(pb::GraphProto {
            name: Some("kiln".into()),
            node: std::mem::take(&mut ex.nodes),
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn input_name(g: &Graph, k: usize) -> String {
    if g.inputs.len() == 1 {
        "input".into()
    } else {
        format!("input{k}")
    }
}

impl Ex<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        let op = self.g.nodes[self.node_idx].op.name();
        Error::invalid(OP, format!("node {} ({op}): {msg}", self.node_idx))
    }

    fn name(&self, s: Src) -> String {
        match s {
            Src::Input(k) => input_name(self.g, k),
            Src::Const(k) => format!("c{k}"),
            Src::Node(k) => format!("v{k}"),
        }
    }

    fn dims(&self, s: Src) -> Vec<Dim> {
        match s {
            Src::Input(k) => self.g.inputs[k].shape.clone(),
            Src::Const(k) => self.g.consts[k]
                .dims()
                .iter()
                .map(|&d| Dim::fixed(d))
                .collect(),
            Src::Node(k) => self.g.nodes[k].shape.clone(),
        }
    }

    fn dtype(&self, s: Src) -> DType {
        match s {
            Src::Input(_) => DType::F32,
            Src::Const(k) => self.g.const_dtypes[k],
            Src::Node(k) => self.g.nodes[k].dtype,
        }
    }

    fn emit_to(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        attrs: Vec<pb::AttributeProto>,
        out: String,
    ) -> String {
        self.fresh += 1;
        self.nodes.push(pb::NodeProto {
            input: inputs,
            output: vec![out.clone()],
            name: Some(format!("{op}_{}", self.fresh)),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// A node with a new output name.
    fn emit(&mut self, op: &str, inputs: Vec<String>, attrs: Vec<pb::AttributeProto>) -> String {
        let out = format!("v{}_{}", self.node_idx, self.fresh + 1);
        self.emit_to(op, inputs, attrs, out)
    }

    fn init(&mut self, dims: &[i64], data_type: i32, raw: Vec<u8>) -> String {
        let name = format!("k{}_{}", self.node_idx, self.inits.len());
        self.inits.push(pb::TensorProto {
            name: Some(name.clone()),
            dims: dims.to_vec(),
            data_type: Some(data_type),
            raw_data: Some(raw),
            ..Default::default()
        });
        name
    }

    fn ints(&mut self, v: &[i64]) -> String {
        self.init(
            &[v.len() as i64],
            elem::INT64,
            bytemuck::cast_slice::<i64, u8>(v).to_vec(),
        )
    }

    /// A float tensor of `dtype` (f32 or f16).
    fn floats(&mut self, dims: &[i64], v: &[f32], dtype: DType) -> String {
        if dtype == DType::F16 {
            let bits: Vec<u16> = v
                .iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect();
            self.init(dims, elem::FLOAT16, bytemuck::cast_slice(&bits).to_vec())
        } else {
            self.init(dims, elem::FLOAT, bytemuck::cast_slice(v).to_vec())
        }
    }

    fn scalar(&mut self, v: f32, dtype: DType) -> String {
        self.floats(&[], &[v], dtype)
    }

    /// The batch size at run time, read from the shape of an input with a batch axis.
    fn batch(&mut self) -> Result<String> {
        if let Some(b) = &self.batch {
            return Ok(b.clone());
        }
        let n = Dim {
            per_batch: 1,
            fixed: 0,
        };
        let (k, axis) = self
            .g
            .inputs
            .iter()
            .enumerate()
            .find_map(|(k, i)| i.shape.iter().position(|&d| d == n).map(|a| (k, a)))
            .ok_or_else(|| self.err("a batch-dependent size, and no input has a batch axis"))?;
        let shape = self.emit("Shape", vec![input_name(self.g, k)], vec![]);
        let idx = self.ints(&[axis as i64]);
        let b = self.emit("Gather", vec![shape, idx], vec![attr_int("axis", 0)]);
        self.batch = Some(b.clone());
        Ok(b)
    }

    /// A 1-D int64 tensor holding `dims` at run time: constants where they are fixed, the
    /// batch size times `per_batch` plus `fixed` where they are not.
    fn shape_tensor(&mut self, dims: &[Dim]) -> Result<String> {
        if dims.iter().all(|d| !d.is_dynamic()) {
            let v: Vec<i64> = dims.iter().map(|d| d.fixed).collect();
            return Ok(self.ints(&v));
        }
        let n = self.batch()?;
        let mut parts = Vec::with_capacity(dims.len());
        for d in dims {
            parts.push(if !d.is_dynamic() {
                self.ints(&[d.fixed])
            } else {
                let k = self.ints(&[d.per_batch]);
                let m = self.emit("Mul", vec![n.clone(), k], vec![]);
                if d.fixed == 0 {
                    m
                } else {
                    let c = self.ints(&[d.fixed]);
                    self.emit("Add", vec![m, c], vec![])
                }
            });
        }
        Ok(self.emit("Concat", parts, vec![attr_int("axis", 0)]))
    }

    fn cast(&mut self, x: String, to: i32) -> String {
        self.emit("Cast", vec![x], vec![attr_int("to", to as i64)])
    }

    /// The final node of graph node `i` writes `v{i}`.
    fn finish(&mut self, x: String) {
        let out = format!("v{}", self.node_idx);
        self.emit_to("Identity", vec![x], vec![], out);
    }

    fn node(&mut self, i: usize) -> Result<()> {
        let node = &self.g.nodes[i];
        let ins: Vec<String> = node.inputs.iter().map(|&s| self.name(s)).collect();
        let x_dims = node
            .inputs
            .first()
            .map(|&s| self.dims(s))
            .unwrap_or_default();
        let dt = node.dtype;
        let out = format!("v{i}");
        match &node.op {
            OpKind::Reshape { shape } => {
                // One batch-dependent size is -1; more are computed from the batch size.
                let dynamic = shape.iter().filter(|d| d.is_dynamic()).count();
                let zero = shape.iter().any(|d| *d == Dim::fixed(0));
                let target = if dynamic == 1 && !zero {
                    let v: Vec<i64> = shape
                        .iter()
                        .map(|d| if d.is_dynamic() { -1 } else { d.fixed })
                        .collect();
                    self.ints(&v)
                } else {
                    self.shape_tensor(shape)?
                };
                let attrs = if zero {
                    vec![attr_int("allowzero", 1)]
                } else {
                    vec![]
                };
                self.emit_to("Reshape", vec![ins[0].clone(), target], attrs, out);
            }
            OpKind::Permute { perm } => {
                let p: Vec<i64> = perm.iter().map(|&v| v as i64).collect();
                self.emit_to("Transpose", ins, vec![attr_ints("perm", &p)], out);
            }
            OpKind::Expand { shape } => {
                let target = self.shape_tensor(shape)?;
                self.emit_to("Expand", vec![ins[0].clone(), target], vec![], out);
            }
            OpKind::Narrow { axis, start, len } => {
                let end = Dim {
                    per_batch: start.per_batch + len.per_batch,
                    fixed: start.fixed + len.fixed,
                };
                let (s, e) = (self.shape_tensor(&[*start])?, self.shape_tensor(&[end])?);
                let a = self.ints(&[*axis as i64]);
                self.emit_to("Slice", vec![ins[0].clone(), s, e, a], vec![], out);
            }
            OpKind::Unary { op, alpha, beta } => {
                let y = self.unary(*op, *alpha, *beta, ins[0].clone(), dt)?;
                self.finish(y);
            }
            OpKind::Binary { op } => {
                let y = self.binary(*op, ins[0].clone(), ins[1].clone());
                self.finish(y);
            }
            OpKind::BinaryScalar { op, scalar, left } => {
                let s = self.scalar(*scalar, dt);
                let (a, b) = if *left {
                    (s, ins[0].clone())
                } else {
                    (ins[0].clone(), s)
                };
                let y = self.binary(*op, a, b);
                self.finish(y);
            }
            OpKind::Where => {
                let c = self.cast(ins[0].clone(), elem::BOOL);
                self.emit_to(
                    "Where",
                    vec![c, ins[1].clone(), ins[2].clone()],
                    vec![],
                    out,
                );
            }
            OpKind::Reduce {
                op,
                axes,
                keepdim,
                correction,
            } => {
                let axes: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                let keep = attr_int("keepdims", *keepdim as i64);
                let y = match op {
                    ReduceOp::Sum => self.reduce_sum(ins[0].clone(), &axes, *keepdim),
                    ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min => {
                        let name = match op {
                            ReduceOp::Mean => "ReduceMean",
                            ReduceOp::Max => "ReduceMax",
                            _ => "ReduceMin",
                        };
                        let mut attrs = vec![keep];
                        if !axes.is_empty() {
                            attrs.push(attr_ints("axes", &axes));
                        }
                        self.emit(name, vec![ins[0].clone()], attrs)
                    }
                    ReduceOp::ArgMax | ReduceOp::ArgMin => {
                        let name = if *op == ReduceOp::ArgMax {
                            "ArgMax"
                        } else {
                            "ArgMin"
                        };
                        let axis = axes.first().copied().unwrap_or(0);
                        let y = self.emit(
                            name,
                            vec![ins[0].clone()],
                            vec![attr_int("axis", axis), keep],
                        );
                        self.cast(y, elem::FLOAT)
                    }
                    ReduceOp::Var => {
                        let rank = x_dims.len() as i64;
                        let all = axes.is_empty();
                        let mut count: i64 = 1;
                        for (k, d) in x_dims.iter().enumerate() {
                            let k = k as i64;
                            if all || axes.iter().any(|&a| a == k || a + rank == k) {
                                if d.is_dynamic() {
                                    return Err(self.err("a variance over the batch axis"));
                                }
                                count *= d.fixed;
                            }
                        }
                        let mut attrs = vec![attr_int("keepdims", 1)];
                        if !all {
                            attrs.push(attr_ints("axes", &axes));
                        }
                        let m = self.emit("ReduceMean", vec![ins[0].clone()], attrs);
                        let d = self.emit("Sub", vec![ins[0].clone(), m], vec![]);
                        let sq = self.emit("Mul", vec![d.clone(), d], vec![]);
                        let s = self.reduce_sum(sq, &axes, *keepdim);
                        let c = self.scalar(count as f32 - correction, dt);
                        self.emit("Div", vec![s, c], vec![])
                    }
                };
                self.finish(y);
            }
            OpKind::Softmax { axis, log } => {
                let name = if *log { "LogSoftmax" } else { "Softmax" };
                self.emit_to(name, ins, vec![attr_int("axis", *axis as i64)], out);
            }
            OpKind::Matmul => {
                self.emit_to("MatMul", ins, vec![], out);
            }
            OpKind::Linear { bias, act } => {
                let y = if x_dims.len() == 2 {
                    self.emit("Gemm", ins.clone(), vec![attr_int("transB", 1)])
                } else {
                    let w = node.inputs[1];
                    let wt = match w {
                        Src::Const(k) if self.g.const_dtypes[k] != DType::I32 => {
                            let t = &self.g.consts[k];
                            let (o, n) = (t.dims()[0], t.dims()[1]);
                            let v = if self.g.const_dtypes[k] == DType::F16 {
                                crate::infer::graph::cast(t, DType::F32)?.to_vec()?
                            } else {
                                t.to_vec()?
                            };
                            let mut tv = vec![0.0; v.len()];
                            for r in 0..o {
                                for c in 0..n {
                                    tv[c * o + r] = v[r * n + c];
                                }
                            }
                            self.floats(&[n as i64, o as i64], &tv, self.g.const_dtypes[k])
                        }
                        _ => self.emit(
                            "Transpose",
                            vec![ins[1].clone()],
                            vec![attr_ints("perm", &[1, 0])],
                        ),
                    };
                    let y = self.emit("MatMul", vec![ins[0].clone(), wt], vec![]);
                    if *bias {
                        self.emit("Add", vec![y, ins[2].clone()], vec![])
                    } else {
                        y
                    }
                };
                let y = self.act(y, *act, dt)?;
                self.finish(y);
            }
            OpKind::Conv2d { opts, act, .. } => {
                let attrs = self.conv_attrs(
                    &x_dims,
                    node.inputs[1],
                    [opts.stride, opts.padding, opts.dilation],
                    opts.groups,
                )?;
                let y = self.emit("Conv", ins, attrs);
                let y = self.act(y, *act, dt)?;
                self.finish(y);
            }
            OpKind::ConvTranspose2d { opts, .. } => {
                let mut attrs = self.conv_attrs(
                    &x_dims,
                    node.inputs[1],
                    [opts.stride, opts.padding, opts.dilation],
                    opts.groups,
                )?;
                attrs.push(attr_ints("output_padding", &pair(opts.output_padding)));
                self.emit_to("ConvTranspose", ins, attrs, out);
            }
            OpKind::Pool { opts, max } => {
                if x_dims.len() != 4 {
                    return Err(self.err("unbatched (rank-3) pooling"));
                }
                let mut attrs = vec![
                    attr_ints("kernel_shape", &pair(opts.kernel)),
                    attr_ints("strides", &pair(opts.stride)),
                    attr_ints("pads", &[pair(opts.padding), pair(opts.padding)].concat()),
                ];
                let name = if *max {
                    attrs.push(attr_ints("dilations", &pair(opts.dilation)));
                    "MaxPool"
                } else {
                    attrs.push(attr_int("count_include_pad", opts.count_include_pad as i64));
                    "AveragePool"
                };
                self.emit_to(name, ins, attrs, out);
            }
            OpKind::AdaptiveAvgPool { size } => {
                if x_dims.len() != 4 {
                    return Err(self.err("unbatched (rank-3) pooling"));
                }
                if *size == [1, 1] {
                    self.emit_to("GlobalAveragePool", ins, vec![], out);
                } else {
                    let (h, w) = (x_dims[2], x_dims[3]);
                    let ok = !h.is_dynamic()
                        && !w.is_dynamic()
                        && h.fixed % size[0] as i64 == 0
                        && w.fixed % size[1] as i64 == 0;
                    if !ok {
                        return Err(self.err(format!(
                            "adaptive pooling of {h:?} x {w:?} to {size:?}: ONNX has it only \
                             for whole windows"
                        )));
                    }
                    let k = [h.fixed / size[0] as i64, w.fixed / size[1] as i64];
                    let attrs = vec![attr_ints("kernel_shape", &k), attr_ints("strides", &k)];
                    self.emit_to("AveragePool", ins, attrs, out);
                }
            }
            OpKind::BatchNorm { eps, weight, bias } => {
                let c = self.dims(node.inputs[1])[0].fixed;
                let scale = if *weight {
                    ins[3].clone()
                } else {
                    self.floats(&[c], &vec![1.0; c as usize], self.dtype(node.inputs[1]))
                };
                let b = if *bias {
                    ins[3 + *weight as usize].clone()
                } else {
                    self.floats(&[c], &vec![0.0; c as usize], self.dtype(node.inputs[1]))
                };
                let inputs = vec![ins[0].clone(), scale, b, ins[1].clone(), ins[2].clone()];
                self.emit_to(
                    "BatchNormalization",
                    inputs,
                    vec![attr_float("epsilon", *eps)],
                    out,
                );
            }
            OpKind::LayerNorm {
                shape,
                eps,
                weight,
                bias,
            } => {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let scale = if *weight {
                    ins[1].clone()
                } else {
                    let n: usize = shape.iter().product();
                    self.floats(&dims, &vec![1.0; n], dt)
                };
                let mut inputs = vec![ins[0].clone(), scale];
                if *bias {
                    inputs.push(ins[1 + *weight as usize].clone());
                }
                let attrs = vec![
                    attr_int("axis", -(shape.len() as i64)),
                    attr_float("epsilon", *eps),
                ];
                self.emit_to("LayerNormalization", inputs, attrs, out);
            }
            OpKind::GroupNorm {
                groups,
                eps,
                weight,
                bias,
            } => {
                let rank = x_dims.len();
                let c = x_dims.get(1).map(|d| d.fixed).unwrap_or(0);
                let s = self.ints(&[0, *groups as i64, -1]);
                let r = self.emit("Reshape", vec![ins[0].clone(), s], vec![]);
                let axes = vec![attr_ints("axes", &[2]), attr_int("keepdims", 1)];
                let m = self.emit("ReduceMean", vec![r.clone()], axes.clone());
                let d = self.emit("Sub", vec![r, m], vec![]);
                let sq = self.emit("Mul", vec![d.clone(), d.clone()], vec![]);
                let v = self.emit("ReduceMean", vec![sq], axes);
                let e = self.scalar(*eps, dt);
                let v = self.emit("Add", vec![v, e], vec![]);
                let sd = self.emit("Sqrt", vec![v], vec![]);
                let y = self.emit("Div", vec![d, sd], vec![]);
                let shape = self.emit("Shape", vec![ins[0].clone()], vec![]);
                let mut y = self.emit("Reshape", vec![y, shape], vec![]);
                // Per-channel parameters broadcast as (C, 1, ...).
                let mut per_channel: Vec<i64> = vec![c];
                per_channel.resize(rank.saturating_sub(1), 1);
                let pc = self.ints(&per_channel);
                if *weight {
                    let w = self.emit("Reshape", vec![ins[1].clone(), pc.clone()], vec![]);
                    y = self.emit("Mul", vec![y, w], vec![]);
                }
                if *bias {
                    let b = self.emit(
                        "Reshape",
                        vec![ins[1 + *weight as usize].clone(), pc],
                        vec![],
                    );
                    y = self.emit("Add", vec![y, b], vec![]);
                }
                self.finish(y);
            }
            OpKind::Concat { axis } => {
                self.emit_to("Concat", ins, vec![attr_int("axis", *axis as i64)], out);
            }
            OpKind::IndexSelect { axis } | OpKind::Gather { axis } => {
                let idx = match self.dtype(node.inputs[1]) {
                    DType::I32 => ins[1].clone(),
                    _ => self.cast(ins[1].clone(), elem::INT64),
                };
                let name = if matches!(node.op, OpKind::Gather { .. }) {
                    "GatherElements"
                } else {
                    "Gather"
                };
                self.emit_to(
                    name,
                    vec![ins[0].clone(), idx],
                    vec![attr_int("axis", *axis as i64)],
                    out,
                );
            }
            OpKind::Full { shape, value } => {
                let s = self.shape_tensor(shape)?;
                let v = pb::TensorProto {
                    dims: vec![1],
                    data_type: Some(elem::FLOAT),
                    raw_data: Some(value.to_le_bytes().to_vec()),
                    ..Default::default()
                };
                let attr = pb::AttributeProto {
                    name: Some("value".into()),
                    r#type: Some(4),
                    t: Some(v),
                    ..Default::default()
                };
                self.emit_to("ConstantOfShape", vec![s], vec![attr], out);
            }
            OpKind::QuantizeRows { .. }
            | OpKind::QuantizeIm2col { .. }
            | OpKind::QuantizeNhwc { .. }
            | OpKind::QGemm { .. }
            | OpKind::QuantizeDynamic => {
                return Err(self.err("int8 graphs do not export to ONNX yet: export the f32 model"));
            }
            OpKind::Cast { to } => {
                self.emit_to(
                    "Cast",
                    ins,
                    vec![attr_int("to", onnx_type(*to) as i64)],
                    out,
                );
            }
        }
        Ok(())
    }

    /// The window attributes of a conv or transposed conv with weight `w`:
    /// `[stride, padding, dilation]` and the groups.
    fn conv_attrs(
        &self,
        x_dims: &[Dim],
        w: Src,
        [stride, padding, dilation]: [[usize; 2]; 3],
        groups: usize,
    ) -> Result<Vec<pb::AttributeProto>> {
        if x_dims.len() != 4 {
            return Err(self.err("an unbatched (rank-3) convolution"));
        }
        let w = self.dims(w);
        Ok(vec![
            attr_ints("kernel_shape", &[w[2].fixed, w[3].fixed]),
            attr_ints("strides", &pair(stride)),
            attr_ints("pads", &[pair(padding), pair(padding)].concat()),
            attr_ints("dilations", &pair(dilation)),
            attr_int("group", groups as i64),
        ])
    }

    fn reduce_sum(&mut self, x: String, axes: &[i64], keepdim: bool) -> String {
        let mut inputs = vec![x];
        if !axes.is_empty() {
            inputs.push(self.ints(axes));
        }
        self.emit(
            "ReduceSum",
            inputs,
            vec![attr_int("keepdims", keepdim as i64)],
        )
    }

    fn act(&mut self, x: String, act: Act, dt: DType) -> Result<String> {
        match act {
            None => Ok(x),
            Some((op, alpha)) => self.unary(op, alpha, 0.0, x, dt),
        }
    }

    fn binary(&mut self, op: BinaryOp, a: String, b: String) -> String {
        let name = match op {
            BinaryOp::Add => "Add",
            BinaryOp::Sub => "Sub",
            BinaryOp::Mul => "Mul",
            BinaryOp::Div => "Div",
            BinaryOp::Pow => "Pow",
            BinaryOp::Maximum => "Max",
            BinaryOp::Minimum => "Min",
            BinaryOp::Eq | BinaryOp::Ne => "Equal",
            BinaryOp::Lt => "Less",
            BinaryOp::Le => "LessOrEqual",
            BinaryOp::Gt => "Greater",
            BinaryOp::Ge => "GreaterOrEqual",
        };
        let y = self.emit(name, vec![a, b], vec![]);
        match op {
            BinaryOp::Ne => {
                let n = self.emit("Not", vec![y], vec![]);
                self.cast(n, elem::FLOAT)
            }
            BinaryOp::Eq | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
                self.cast(y, elem::FLOAT)
            }
            _ => y,
        }
    }

    /// A kiln unary op as ONNX ops; the result's name.
    fn unary(
        &mut self,
        op: UnaryOp,
        alpha: f32,
        beta: f32,
        x: String,
        dt: DType,
    ) -> Result<String> {
        let plain = |s: &str| Some(s.to_string());
        let direct = match op {
            UnaryOp::Identity => plain("Identity"),
            UnaryOp::Neg => plain("Neg"),
            UnaryOp::Abs => plain("Abs"),
            UnaryOp::Exp => plain("Exp"),
            UnaryOp::Log => plain("Log"),
            UnaryOp::Sqrt => plain("Sqrt"),
            UnaryOp::Relu => plain("Relu"),
            UnaryOp::Sigmoid => plain("Sigmoid"),
            UnaryOp::Tanh => plain("Tanh"),
            UnaryOp::Sin => plain("Sin"),
            UnaryOp::Cos => plain("Cos"),
            UnaryOp::Erf => plain("Erf"),
            _ => None,
        };
        if let Some(name) = direct {
            return Ok(self.emit(&name, vec![x], vec![]));
        }
        Ok(match op {
            UnaryOp::Rsqrt => {
                let s = self.emit("Sqrt", vec![x], vec![]);
                self.emit("Reciprocal", vec![s], vec![])
            }
            UnaryOp::LeakyRelu => self.emit("LeakyRelu", vec![x], vec![attr_float("alpha", alpha)]),
            UnaryOp::Gelu => {
                let k = self.scalar(std::f32::consts::FRAC_1_SQRT_2, dt);
                let s = self.emit("Mul", vec![x.clone(), k], vec![]);
                let e = self.emit("Erf", vec![s], vec![]);
                let one = self.scalar(1.0, dt);
                let p = self.emit("Add", vec![e, one], vec![]);
                let m = self.emit("Mul", vec![x, p], vec![]);
                let half = self.scalar(0.5, dt);
                self.emit("Mul", vec![m, half], vec![])
            }
            UnaryOp::GeluTanh => {
                let x2 = self.emit("Mul", vec![x.clone(), x.clone()], vec![]);
                let x3 = self.emit("Mul", vec![x2, x.clone()], vec![]);
                let c = self.scalar(0.044715, dt);
                let t = self.emit("Mul", vec![x3, c], vec![]);
                let inner = self.emit("Add", vec![x.clone(), t], vec![]);
                let k = self.scalar((2.0 / std::f32::consts::PI).sqrt(), dt);
                let z = self.emit("Mul", vec![inner, k], vec![]);
                let th = self.emit("Tanh", vec![z], vec![]);
                let one = self.scalar(1.0, dt);
                let p = self.emit("Add", vec![th, one], vec![]);
                let m = self.emit("Mul", vec![x, p], vec![]);
                let half = self.scalar(0.5, dt);
                self.emit("Mul", vec![m, half], vec![])
            }
            UnaryOp::Silu => {
                let s = self.emit("Sigmoid", vec![x.clone()], vec![]);
                self.emit("Mul", vec![x, s], vec![])
            }
            UnaryOp::Clamp => {
                let (lo, hi) = (self.scalar(alpha, dt), self.scalar(beta, dt));
                self.emit("Clip", vec![x, lo, hi], vec![])
            }
            UnaryOp::Trunc => {
                // A cast to an integer rounds toward zero.
                let i = self.cast(x, elem::INT64);
                self.cast(i, onnx_type(dt))
            }
            UnaryOp::Log1p => {
                let one = self.scalar(1.0, dt);
                let p = self.emit("Add", vec![x, one], vec![]);
                self.emit("Log", vec![p], vec![])
            }
            UnaryOp::Softplus => {
                // kiln's softplus has alpha = beta and beta = threshold; ONNX's has beta 1
                // and no threshold: x where beta x > threshold, else softplus(beta x) / beta.
                let b = self.scalar(alpha, dt);
                let z = self.emit("Mul", vec![x.clone(), b.clone()], vec![]);
                let s = self.emit("Softplus", vec![z.clone()], vec![]);
                let s = self.emit("Div", vec![s, b], vec![]);
                let t = self.scalar(beta, dt);
                let over = self.emit("Greater", vec![z, t], vec![]);
                self.emit("Where", vec![over, x, s], vec![])
            }
            other => return Err(self.err(format!("unary op {other:?} has no ONNX form"))),
        })
    }
}
