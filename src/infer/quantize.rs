//! Static post-training int8 quantization of a frozen model: calibration batches run through
//! the f32 graph, an observer takes the range of each quantized layer's input, and every
//! linear layer, matmul with a constant right operand and convolution (groups 1) with
//! constant weights becomes quantize → integer product: int8 weights symmetric per output
//! channel, int8 activations asymmetric per tensor, i32 accumulation, bias in i32 at the
//! product's scale (as ONNX Runtime's QDQ models), and dequantization with the activation
//! fused in the product's epilogue. Every other op stays f32. Where a product's result goes
//! only to the next product's quantization (a redundant dequantize/quantize pair), the
//! product requantizes in integers instead and hands over int8 ([`chain`]).
//!
//! A convolution reads its input's quantized pixels through its window
//! (`OpKind::QuantizeNhwc`, channels innermost, the zero point in the padding), except where
//! few input channels would make that wasteful (a first layer on 1 or 3 channels), which
//! quantizes patch rows (`OpKind::QuantizeIm2col`).

use std::collections::HashMap;

use super::graph::{DType, Dim, Graph, Node, OpKind, Src};
use super::InferenceModel;
use crate::error::{Error, Result};
use crate::ops::quant::{channel_words, pack_rows, padded_words, QOut, QWindow};
use crate::quant::{weight_params, QParams};
use crate::tensor::Tensor;
use crate::Conv2dOptions;

const OP: &str = "InferenceModel::quantize";

/// How a layer input's range is taken from the calibration batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Observer {
    /// The smallest and largest value seen (ONNX Runtime's MinMax).
    MinMax,
    /// The range holding the central `p` percent of the values (for example 99.99: 0.005% cut
    /// from each side), which clips outliers, as ONNX Runtime's percentile calibration.
    Percentile(f32),
}

/// Options of [`InferenceModel::quantize`].
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// Calibration batches, each a valid input of the model (its first input).
    pub calibration: Vec<Tensor>,
    /// How activation ranges are observed.
    pub observer: Observer,
}

/// Values kept per observed node: the running range, and for percentiles a sample.
#[derive(Default)]
struct Seen {
    min: f32,
    max: f32,
    sample: Vec<f32>,
    any: bool,
}

/// Most values kept per node for a percentile.
const SAMPLE: usize = 1 << 20;

fn quantizable(g: &Graph, node: &Node) -> bool {
    let const_f32 = |s: Src| matches!(s, Src::Const(k) if g.const_dtypes[k] == DType::F32);
    // A bias computed at run time keeps the node in f32.
    if node.inputs.len() > 2 && !const_f32(node.inputs[2]) {
        return false;
    }
    match &node.op {
        OpKind::Linear { .. } | OpKind::Matmul => {
            // A matmul qualifies when its right operand is a constant matrix (x @ W).
            let matrix = |s: Src| matches!(s, Src::Const(k) if g.consts[k].rank() == 2);
            let leading = &node.shape[..node.shape.len().saturating_sub(1)];
            node.dtype == DType::F32
                && const_f32(node.inputs[1])
                && (node.op != OpKind::Matmul || matrix(node.inputs[1]))
                && leading.iter().filter(|d| d.is_dynamic()).count() <= 1
        }
        OpKind::Conv2d { opts, .. } => {
            node.dtype == DType::F32
                && opts.groups == 1
                && node.shape.len() == 4
                && !node.shape[2].is_dynamic()
                && !node.shape[3].is_dynamic()
                && const_f32(node.inputs[1])
        }
        _ => false,
    }
}

impl InferenceModel {
    /// The model with its linear layers, constant-weight matmuls and convolutions (groups 1,
    /// constant weights) run as int8 integer kernels, calibrated on `opts.calibration`:
    /// weights int8 symmetric per output channel, activations int8 asymmetric per tensor from
    /// the observed range, i32 accumulation, bias and activation fused. Other ops stay f32;
    /// consecutive integer products hand over int8 without a float round trip.
    ///
    /// `Err` for an empty calibration set, a batch the model does not accept, a percentile
    /// outside (0, 100], or an f16 model.
    ///
    /// ```
    /// use kiln::infer::{freeze, Observer, QuantizeOptions};
    /// use kiln::nn::{Init, Sequential};
    /// # let dev = kiln::Device::default_device()?;
    /// let net = Sequential::from_spec(&mut Init::new(&dev, 0), "linear(8,16) relu linear(16,4)")?;
    /// let frozen = freeze(net, &kiln::Tensor::randn(&[2, 8], 1, &dev)?)?;
    /// let calibration = vec![kiln::Tensor::randn(&[32, 8], 2, &dev)?];
    /// let int8 = frozen.quantize(&QuantizeOptions { calibration, observer: Observer::MinMax })?;
    /// let x = kiln::Tensor::randn(&[5, 8], 3, &dev)?;
    /// let (a, b) = (frozen.predict(&x)?.to_vec()?, int8.predict(&x)?.to_vec()?);
    /// assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 0.1));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn quantize(&self, opts: &QuantizeOptions) -> Result<InferenceModel> {
        if opts.calibration.is_empty() {
            return Err(Error::invalid(OP, "the calibration set is empty"));
        }
        if let Observer::Percentile(p) = opts.observer {
            if !(p > 0.0 && p <= 100.0) {
                return Err(Error::invalid(
                    OP,
                    format!("percentile {p} is outside (0, 100]"),
                ));
            }
        }
        if self.precision != super::Precision::F32 {
            return Err(Error::invalid(
                OP,
                "quantize the f32 model, not the f16 one",
            ));
        }
        if self.graph.inputs.len() != 1 {
            return Err(Error::invalid(
                OP,
                format!(
                    "the model has {} inputs; calibration feeds one",
                    self.graph.inputs.len()
                ),
            ));
        }
        let g = &self.graph;
        let targets: Vec<usize> = (0..g.nodes.len())
            .filter(|&i| quantizable(g, &g.nodes[i]))
            .collect();
        let mut seen: HashMap<usize, Seen> =
            targets.iter().map(|&i| (i, Seen::default())).collect();
        let percentile = matches!(opts.observer, Observer::Percentile(_));
        for (b, x) in opts.calibration.iter().enumerate() {
            let mut observe = |i: usize, ins: &[&Tensor]| -> Result<()> {
                let Some(s) = seen.get_mut(&i) else {
                    return Ok(());
                };
                let v = ins[0].to_vec()?;
                for &e in &v {
                    if !e.is_finite() {
                        return Err(Error::invalid(
                            OP,
                            format!("calibration batch {b}: node {i} reads a non-finite value"),
                        ));
                    }
                }
                let (lo, hi) = v
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, c), &e| (a.min(e), c.max(e)));
                if !v.is_empty() {
                    if s.any {
                        s.min = s.min.min(lo);
                        s.max = s.max.max(hi);
                    } else {
                        (s.min, s.max, s.any) = (lo, hi, true);
                    }
                }
                if percentile {
                    let step = (v.len() / (SAMPLE / opts.calibration.len()).max(1)).max(1);
                    s.sample.extend(v.iter().step_by(step));
                }
                Ok(())
            };
            self.run_observed(&[x], &mut observe)
                .map_err(|e| Error::invalid(OP, format!("calibration batch {b}: {e}")))?;
        }
        let mut ranges: HashMap<usize, QParams> = HashMap::new();
        for (&i, s) in &mut seen {
            let (lo, hi) = match opts.observer {
                Observer::MinMax => (s.min, s.max),
                Observer::Percentile(p) => {
                    if s.sample.is_empty() {
                        return Err(Error::invalid(
                            OP,
                            format!("node {i} saw no values in the calibration batches"),
                        ));
                    }
                    s.sample.sort_by(f32::total_cmp);
                    let last = s.sample.len() - 1;
                    let at = |q: f64| s.sample[((last as f64 * q).round() as usize).min(last)];
                    let cut = (1.0 - p as f64 / 100.0) / 2.0;
                    (at(cut), at(1.0 - cut))
                }
            };
            ranges.insert(i, QParams::asymmetric(lo, hi)?);
        }
        let graph = rewrite(g, &ranges)?;
        self.device.synchronize()?;
        Ok(InferenceModel::from_graph(self.device.clone(), graph))
    }

    /// The model with its linear layers and constant-weight matmuls run with int8 weights (symmetric
    /// per output channel) and activations quantized at run time, per batch, with the range
    /// of each batch: no calibration. Convolutions and other ops stay f32.
    ///
    /// ```
    /// use kiln::nn::{Init, Sequential};
    /// # let dev = kiln::Device::default_device()?;
    /// let net = Sequential::from_spec(&mut Init::new(&dev, 0), "linear(8,16) relu linear(16,4)")?;
    /// let frozen = kiln::infer::freeze(net, &kiln::Tensor::randn(&[2, 8], 1, &dev)?)?;
    /// let int8 = frozen.quantize_dynamic()?;
    /// let x = kiln::Tensor::randn(&[5, 8], 3, &dev)?;
    /// let (a, b) = (frozen.predict(&x)?.to_vec()?, int8.predict(&x)?.to_vec()?);
    /// assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 0.1));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn quantize_dynamic(&self) -> Result<InferenceModel> {
        const OP: &str = "InferenceModel::quantize_dynamic";
        if self.precision != super::Precision::F32 {
            return Err(Error::invalid(
                OP,
                "quantize the f32 model, not the f16 one",
            ));
        }
        let g = &self.graph;
        let targets: std::collections::HashSet<usize> = (0..g.nodes.len())
            .filter(|&i| {
                matches!(g.nodes[i].op, OpKind::Linear { .. } | OpKind::Matmul)
                    && quantizable(g, &g.nodes[i])
            })
            .collect();
        let graph = rewrite_with(g, &|i| targets.contains(&i).then_some(Mode::Dynamic))?;
        self.device.synchronize()?;
        Ok(InferenceModel::from_graph(self.device.clone(), graph))
    }
}

/// How one node is quantized.
#[derive(Clone, Copy)]
enum Mode {
    /// Activations with these calibrated parameters.
    Static(QParams),
    /// Activations quantized at run time.
    Dynamic,
}

fn rewrite(g: &Graph, ranges: &HashMap<usize, QParams>) -> Result<Graph> {
    rewrite_with(g, &|i| ranges.get(&i).map(|&q| Mode::Static(q)))
}

/// The graph with each node that `mode_of` names replaced by quantize → integer product.
fn rewrite_with(g: &Graph, mode_of: &dyn Fn(usize) -> Option<Mode>) -> Result<Graph> {
    let _no_grad = crate::autograd::NoGradGuard::new();
    let mut out = Graph {
        inputs: g.inputs.clone(),
        consts: g.consts.clone(),
        const_dtypes: g.const_dtypes.clone(),
        nodes: Vec::with_capacity(g.nodes.len()),
        outputs: Vec::new(),
    };
    let dev = g.consts.first().map(|c| c.device().clone());
    let mut map: Vec<Src> = Vec::with_capacity(g.nodes.len());
    // Per static integer product (its node in `out`): what requantizing its result needs.
    let mut products: Vec<Product> = Vec::new();
    // The quantization nodes made so far: what they read, how, and the node.
    let mut quantized: Vec<(Src, OpKind, Src)> = Vec::new();
    let remap = |s: Src, map: &[Src]| match s {
        Src::Node(k) => map[k],
        other => other,
    };
    let shape_of = |s: Src, out: &Graph| -> Vec<Dim> {
        match s {
            Src::Input(k) => out.inputs[k].shape.clone(),
            Src::Const(k) => out.consts[k]
                .dims()
                .iter()
                .map(|&d| Dim::fixed(d))
                .collect(),
            Src::Node(k) => out.nodes[k].shape.clone(),
        }
    };
    for (i, node) in g.nodes.iter().enumerate() {
        let inputs: Vec<Src> = node.inputs.iter().map(|&s| remap(s, &map)).collect();
        let (Some(mode), Some(dev)) = (mode_of(i), dev.as_ref()) else {
            out.nodes.push(Node {
                inputs,
                ..node.clone()
            });
            map.push(Src::Node(out.nodes.len() - 1));
            continue;
        };
        let Src::Const(wk) = inputs[1] else {
            return Err(Error::invalid(
                OP,
                "internal: a quantized weight is not a constant",
            ));
        };
        let mut w = g.consts[wk].to_vec()?;
        let mut n = g.consts[wk].dims()[0];
        if node.op == OpKind::Matmul {
            // x @ W with W (k, n): the product reads W^T's rows.
            let k = n;
            n = g.consts[wk].dims()[1];
            w = (0..n * k).map(|e| w[(e % k) * n + e / k]).collect();
        }
        let k = w.len() / n.max(1);
        let (bias, act, conv) = match &node.op {
            OpKind::Linear { bias, act } => (*bias, *act, None),
            OpKind::Matmul => (false, None, None),
            OpKind::Conv2d { opts, bias, act } => {
                let d = g.consts[wk].dims();
                (*bias, *act, Some(([d[2], d[3]], *opts)))
            }
            _ => return Err(Error::invalid(OP, "internal: not a linear or conv node")),
        };
        let b: Vec<f32> = match (bias, inputs.get(2)) {
            (true, Some(&Src::Const(bk))) => g.consts[bk].to_vec()?,
            (true, _) => return Err(Error::invalid(OP, "internal: a bias that is not constant")),
            (false, _) => vec![0.0; n],
        };
        // Weights: int8, symmetric per output channel.
        let wp = weight_params(&w, n)?;
        let wq: Vec<i8> = w
            .iter()
            .enumerate()
            .map(|(e, &v)| wp[e / k].quantize(v))
            .collect();
        // A convolution reads its input's pixels directly (taps outermost in the weights,
        // channels padded to 16 a tap) unless padding its channels costs more than half as
        // much again as patch rows do, as for a first layer of 1 or 3 channels.
        let direct = conv.and_then(|([kh, kw], _)| {
            let c = k / (kh * kw);
            (2 * kh * kw * padded_words(c) <= 3 * padded_words(k)).then_some((c, kh * kw))
        });
        let w_words = match direct {
            None => pack_rows(&wq, k, padded_words(k), 0),
            Some((c, taps)) => {
                // (n, c, taps) to (n, taps, c).
                let mut t = vec![0i8; wq.len()];
                for o in 0..n {
                    for ci in 0..c {
                        for tap in 0..taps {
                            t[(o * taps + tap) * c + ci] = wq[(o * c + ci) * taps + tap];
                        }
                    }
                }
                pack_rows(&t, c, padded_words(c), 0)
            }
        };
        let w_t = Tensor::from_slice_i32(
            &w_words.iter().map(|&v| v as i32).collect::<Vec<_>>(),
            &[n, w_words.len() / n.max(1)],
            dev,
        )?;
        let qa = match mode {
            Mode::Static(qa) => qa,
            Mode::Dynamic => {
                // Channel data: the weight row's sum, its scale, the f32 bias.
                let wsum: Vec<u32> = (0..n)
                    .map(|c| {
                        wq[c * k..(c + 1) * k]
                            .iter()
                            .map(|&v| v as i32)
                            .sum::<i32>() as u32
                    })
                    .collect();
                let scales: Vec<u32> = wp.iter().map(|p| p.scale.to_bits()).collect();
                let bias: Vec<u32> = b.iter().map(|v| v.to_bits()).collect();
                let ch = channel_words(&[&wsum, &scales, &bias], &QOut::Dynamic { act: None });
                let wsrc = push_const(&mut out, w_t);
                let csrc = push_const(&mut out, words_tensor(&ch, dev)?);
                let x = inputs[0];
                let x_shape = shape_of(x, &out);
                let rows = product(&x_shape[..x_shape.len() - 1]);
                let k4 = padded_words(k) as i64;
                out.nodes.push(Node {
                    op: OpKind::QuantizeDynamic,
                    inputs: vec![x],
                    shape: vec![Dim {
                        per_batch: rows.per_batch * k4,
                        fixed: rows.fixed * k4 + 4,
                    }],
                    dtype: DType::I32,
                });
                let a = Src::Node(out.nodes.len() - 1);
                out.nodes.push(Node {
                    op: OpKind::QGemm {
                        n,
                        act,
                        spatial: None,
                        dynamic: true,
                        window: None,
                        int8_out: None,
                    },
                    inputs: vec![a, wsrc, csrc],
                    shape: vec![rows, Dim::fixed(n)],
                    dtype: DType::F32,
                });
                reshape_back(&mut out, &node.shape);
                map.push(Src::Node(out.nodes.len() - 1));
                continue;
            }
        };
        // Bias at the product's scale, with the activation zero point's correction folded in.
        let mut folded = Vec::with_capacity(n);
        let mut scales = Vec::with_capacity(n);
        for c in 0..n {
            let s = qa.scale * wp[c].scale;
            // As ONNX Runtime quantizes a bias: in f32, at the product's scale.
            let bq = (b[c] / s).round_ties_even() as f64;
            let wsum: i64 = wq[c * k..(c + 1) * k].iter().map(|&v| v as i64).sum();
            let total = bq - (qa.zero_point as i64 * wsum) as f64;
            if total.abs() > i32::MAX as f64 / 2.0 {
                return Err(Error::invalid(
                    OP,
                    format!("node {i}: bias {} is beyond int32 at scale {s}", b[c]),
                ));
            }
            folded.push(total as i32);
            scales.push(s.to_bits());
        }
        let bias_words: Vec<u32> = folded.iter().map(|&b| b as u32).collect();
        let ch_t = words_tensor(
            &channel_words(&[&bias_words, &scales], &QOut::F32 { act: None }),
            dev,
        )?;
        let wsrc = push_const(&mut out, w_t);
        let csrc = push_const(&mut out, ch_t);
        let record = Product {
            node: 0,
            scales: (0..n)
                .map(|c| qa.scale as f64 * wp[c].scale as f64)
                .collect(),
            bias: folded,
        };
        let x = inputs[0];
        let x_shape = shape_of(x, &out);
        let (qop, a_shape, spatial, window) = match (conv, direct) {
            (None, _) => {
                let rows = product(&x_shape[..x_shape.len() - 1]);
                (
                    OpKind::QuantizeRows {
                        scale: qa.scale,
                        zero_point: qa.zero_point,
                    },
                    vec![rows, Dim::fixed(padded_words(k))],
                    None,
                    None,
                )
            }
            (Some((kernel, opts)), Some((c, _))) => {
                let (oh, ow) = (node.shape[2].fixed as usize, node.shape[3].fixed as usize);
                let (h, w) = (x_shape[2].fixed as usize, x_shape[3].fixed as usize);
                let pixels = (h * w) as i64;
                let window = QWindow {
                    kernel,
                    stride: opts.stride,
                    padding: opts.padding,
                    dilation: opts.dilation,
                    grid: [h, w],
                    zero_point: qa.zero_point,
                };
                (
                    OpKind::QuantizeNhwc {
                        scale: qa.scale,
                        zero_point: qa.zero_point,
                    },
                    vec![
                        Dim {
                            per_batch: x_shape[0].per_batch * pixels,
                            fixed: x_shape[0].fixed * pixels,
                        },
                        Dim::fixed(padded_words(c)),
                    ],
                    Some([oh, ow]),
                    Some(window),
                )
            }
            (Some((kernel, opts)), None) => {
                let (oh, ow) = (node.shape[2].fixed as usize, node.shape[3].fixed as usize);
                let rows = Dim {
                    per_batch: node.shape[0].per_batch * (oh * ow) as i64,
                    fixed: node.shape[0].fixed * (oh * ow) as i64,
                };
                (
                    OpKind::QuantizeIm2col {
                        scale: qa.scale,
                        zero_point: qa.zero_point,
                        kernel,
                        opts: Conv2dOptions { groups: 1, ..opts },
                    },
                    vec![rows, Dim::fixed(padded_words(k))],
                    Some([oh, ow]),
                    None,
                )
            }
        };
        let rows = a_shape[0];
        // Layers that read one tensor with the same parameters (a block's first convolution
        // and its projection) share its quantization.
        let a = match quantized
            .iter()
            .find(|(src, op, _)| *src == x && *op == qop)
        {
            Some(&(_, _, a)) => a,
            None => {
                out.nodes.push(Node {
                    op: qop.clone(),
                    inputs: vec![x],
                    shape: a_shape,
                    dtype: DType::I32,
                });
                let a = Src::Node(out.nodes.len() - 1);
                quantized.push((x, qop, a));
                a
            }
        };
        let gemm_shape = match spatial {
            None => vec![rows, Dim::fixed(n)],
            Some(_) => node.shape.clone(),
        };
        out.nodes.push(Node {
            op: OpKind::QGemm {
                n,
                act,
                spatial,
                dynamic: false,
                window,
                int8_out: None,
            },
            inputs: vec![a, wsrc, csrc],
            shape: gemm_shape,
            dtype: DType::F32,
        });
        products.push(Product {
            node: out.nodes.len() - 1,
            ..record
        });
        reshape_back(&mut out, &node.shape);
        map.push(Src::Node(out.nodes.len() - 1));
    }
    out.outputs = g.outputs.iter().map(|&s| remap(s, &map)).collect();
    chain(&mut out, &products)?;
    super::passes::eliminate_dead(&mut out);
    // The shapes of the rewritten graph, checked at two batch sizes by the op's rules.
    for n in [1usize, 2] {
        let shapes = out
            .inputs
            .iter()
            .map(|i| super::graph::dims_at(&i.shape, n))
            .collect::<Result<Vec<_>>>()?;
        out.infer_shapes(&shapes, n)?;
    }
    Ok(out)
}

/// A static integer product of the rewritten graph: its node, the real scale of each
/// channel's accumulator (activation scale times weight scale), and its folded i32 bias.
struct Product {
    node: usize,
    scales: Vec<f64>,
    bias: Vec<i32>,
}

/// Removes the redundant dequantize/quantize pairs between integer products: where a
/// product's f32 result (no activation, or relu) goes only to the quantization of the next
/// product's input, the product requantizes its accumulators to that input's scale and zero
/// point in integers (relu as a clamp at the zero point) and writes int8 rows, which are the
/// next product's operand as the quantization would have written it. The quantization node
/// is left dead.
fn chain(g: &mut Graph, products: &[Product]) -> Result<()> {
    use crate::ops::elementwise::UnaryOp;
    use crate::ops::quant::multiplier;
    for p in products {
        let j = p.node;
        let readers: Vec<usize> = (0..g.nodes.len())
            .filter(|&k| g.nodes[k].inputs.contains(&Src::Node(j)))
            .collect();
        if g.outputs.contains(&Src::Node(j)) || readers.len() != 1 {
            continue;
        }
        let q = readers[0];
        let OpKind::QGemm {
            act,
            spatial,
            dynamic: false,
            int8_out: None,
            ..
        } = g.nodes[j].op
        else {
            continue;
        };
        let (scale, zero_point) = match (g.nodes[q].op.clone(), spatial) {
            (OpKind::QuantizeRows { scale, zero_point }, None)
            | (OpKind::QuantizeNhwc { scale, zero_point }, Some(_)) => (scale, zero_point),
            _ => continue,
        };
        if !matches!(act, None | Some((UnaryOp::Relu, _))) {
            continue;
        }
        // A ratio beyond the multiplier's range (a channel of zero weights next to a tiny
        // scale) keeps this pair in f32.
        let Ok(requant) = p
            .scales
            .iter()
            .map(|&s| multiplier(OP, s / scale as f64))
            .collect::<Result<Vec<_>>>()
        else {
            continue;
        };
        let (mults, shifts): (Vec<u32>, Vec<u32>) = requant.into_iter().unzip();
        let dev = g.consts[0].device().clone();
        let ch = push_const(
            g,
            words_tensor(
                &channel_words(
                    &[
                        &p.bias.iter().map(|&b| b as u32).collect::<Vec<_>>(),
                        &mults,
                        &shifts,
                    ],
                    &QOut::I8 {
                        zy: zero_point,
                        relu: false,
                    },
                ),
                &dev,
            )?,
        );
        let shape = g.nodes[q].shape.clone();
        let node = &mut g.nodes[j];
        node.inputs[2] = ch;
        if let OpKind::QGemm { int8_out, .. } = &mut node.op {
            *int8_out = Some(zero_point);
        }
        node.shape = shape;
        node.dtype = DType::I32;
        for n in &mut g.nodes {
            for s in &mut n.inputs {
                if *s == Src::Node(q) {
                    *s = Src::Node(j);
                }
            }
        }
    }
    Ok(())
}

/// A linear over (..., k) computes (rows, n): a reshape back to the node's own shape when
/// the last node's differs.
fn reshape_back(g: &mut Graph, shape: &[Dim]) {
    let last = g.nodes.len() - 1;
    if g.nodes[last].shape != shape {
        g.nodes.push(Node {
            op: OpKind::Reshape {
                shape: shape.to_vec(),
            },
            inputs: vec![Src::Node(last)],
            shape: shape.to_vec(),
            dtype: DType::F32,
        });
    }
}

fn words_tensor(w: &[u32], dev: &crate::Device) -> Result<Tensor> {
    let v: Vec<i32> = w.iter().map(|&v| v as i32).collect();
    Tensor::from_slice_i32(&v, &[v.len()], dev)
}

fn push_const(g: &mut Graph, t: Tensor) -> Src {
    g.const_dtypes.push(t.dtype());
    g.consts.push(t);
    Src::Const(g.consts.len() - 1)
}

/// The product of sizes with at most one batch-dependent factor.
fn product(dims: &[Dim]) -> Dim {
    dims.iter().fold(Dim::fixed(1), |acc, d| {
        if acc.is_dynamic() {
            Dim {
                per_batch: acc.per_batch * d.fixed,
                fixed: acc.fixed * d.fixed,
            }
        } else {
            Dim {
                per_batch: d.per_batch * acc.fixed,
                fixed: d.fixed * acc.fixed,
            }
        }
    })
}
