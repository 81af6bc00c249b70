//! Frozen inference: any model's forward pass captured as a graph of kiln's own ops
//! ([`freeze`], [`freeze_fn`]), optimised (batch norm folded, bias and activation fused into
//! the producing kernel, constant subgraphs computed once, dead nodes removed), run with a
//! liveness-based memory plan per input shape, and saved as one file that loads without the
//! model's code ([`InferenceModel::save`], [`InferenceModel::load`]).
//!
//! The graph holds only weights: no autograd graph, no gradient and no optimizer buffers.
//! The batch axis is symbolic, so one frozen model serves every batch size.
//!
//! ```
//! use kiln::nn::{Init, Module, Sequential};
//! # let dev = kiln::Device::default_device()?;
//! let spec = "conv2d(1,4,3,p=1) batchnorm2d(4) relu maxpool2d(2) flatten linear(64,10)";
//! let model = Sequential::from_spec(&mut Init::new(&dev, 0), spec)?;
//! let example = kiln::Tensor::randn(&[2, 1, 8, 8], 1, &dev)?;
//! let frozen = kiln::infer::freeze(model, &example)?;
//! let x = kiln::Tensor::randn(&[5, 1, 8, 8], 2, &dev)?;
//! assert_eq!(frozen.predict(&x)?.dims(), &[5, 10]);
//! # Ok::<(), kiln::Error>(())
//! ```

mod artifact;
pub(crate) mod capture;
pub(crate) mod graph;
#[cfg(feature = "onnx")]
mod onnx;
mod passes;
mod plan;
mod quantize;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use graph::{DType, Dim};
#[cfg(feature = "onnx")]
pub use onnx::{MAX_ONNX_BYTES, ONNX_OPSET};
pub use quantize::{Observer, QuantizeOptions};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::Module;
use crate::tensor::Tensor;
use graph::{Graph, Node, OpKind, Src};

/// Host bytes of memory plans a model keeps (one plan per set of input shapes); past this,
/// the least recently used plans go. Plans hold shapes only: GPU memory is the device pool's.
pub const PLAN_CACHE_BYTES: usize = 1 << 20;

/// The plans of one model, least recently used first out.
#[derive(Default)]
struct PlanCache {
    plans: HashMap<Vec<Vec<usize>>, (Arc<plan::Plan>, u64)>,
    clock: u64,
    bytes: usize,
}

impl PlanCache {
    fn get(&mut self, shapes: &[Vec<usize>]) -> Option<Arc<plan::Plan>> {
        self.clock += 1;
        let clock = self.clock;
        self.plans.get_mut(shapes).map(|(p, used)| {
            *used = clock;
            p.clone()
        })
    }

    fn insert(&mut self, shapes: Vec<Vec<usize>>, p: Arc<plan::Plan>) {
        let cost = p.host_bytes();
        while self.bytes + cost > PLAN_CACHE_BYTES && !self.plans.is_empty() {
            let oldest = self
                .plans
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some((old, _)) = oldest.and_then(|k| self.plans.remove(&k)) {
                self.bytes -= old.host_bytes();
            }
        }
        self.clock += 1;
        if let Some((old, _)) = self.plans.insert(shapes, (p, self.clock)) {
            self.bytes -= old.host_bytes();
        }
        self.bytes += cost;
    }
}

/// Element type of an inference model's weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    F32,
    /// 16-bit floats in memory, f32 arithmetic inside the kernels (needs `SHADER_F16`); ops
    /// without a half-precision kernel run in f32 between conversions.
    F16,
}

/// What the memory plan of one input shape needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Bytes of activation buffers alive at once when each buffer is reused, by size class,
    /// as soon as its last reader has run.
    pub planned_bytes: u64,
    /// Bytes of all activations of a forward pass, as if none were reused.
    pub activation_bytes: u64,
}

/// A frozen model: a graph of ops over constant weights.
///
/// Safe to share between threads: calls hold no lock while they run, and each call's
/// activations are its own.
pub struct InferenceModel {
    device: Device,
    graph: Graph,
    plans: Mutex<PlanCache>,
    precision: Precision,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Freezes a module for inference: switches it to eval mode, captures its forward pass on
/// `example` (whose axis 0 is the batch axis), and consumes it, so that no gradient or
/// optimizer state stays alive through it (drop the optimizer too).
pub fn freeze<M: Module>(mut model: M, example: &Tensor) -> Result<InferenceModel> {
    model.set_training(false);
    let m = &model;
    let graph = capture::capture(std::slice::from_ref(example), &[Some(0)], &|xs| {
        Ok(vec![m.forward(&xs[0])?])
    })?;
    drop(model);
    InferenceModel::compile(example.device().clone(), graph)
}

/// Freezes any forward function over several inputs and outputs (for example tokens plus an
/// attention mask): `f` runs on `inputs` with capture on, and `batch_axes[k]` is the batch
/// axis of input `k` (`None` for inputs without one, such as a mask shared by the batch).
/// Tensors the function reads that no op inside it made are frozen as constants.
///
/// ```
/// # let dev = kiln::Device::default_device()?;
/// let w = kiln::Tensor::randn(&[4, 3], 0, &dev)?;
/// let x = kiln::Tensor::randn(&[2, 3], 1, &dev)?;
/// let scale = kiln::Tensor::randn(&[4], 2, &dev)?;
/// let frozen = kiln::infer::freeze_fn(&[x, scale], &[Some(0), None], |t| {
///     let y = t[0].matmul(&w.t()?)?.relu()?;
///     Ok(vec![y.mul(&t[1])?, y.sum(&[-1], false)?])
/// })?;
/// let x = kiln::Tensor::randn(&[7, 3], 3, &dev)?;
/// let s = kiln::Tensor::ones(&[4], &dev)?;
/// let out = frozen.run(&[&x, &s])?;
/// assert_eq!(out[0].dims(), &[7, 4]);
/// assert_eq!(out[1].dims(), &[7]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn freeze_fn(
    inputs: &[Tensor],
    batch_axes: &[Option<usize>],
    f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<InferenceModel> {
    let device = inputs
        .first()
        .map(|t| t.device().clone())
        .ok_or_else(|| Error::invalid("freeze_fn", "needs at least one example input"))?;
    let graph = capture::capture(inputs, batch_axes, &f)?;
    InferenceModel::compile(device, graph)
}

/// A tensor holding `t`'s values as f16 (storage sized for halves, layout counting elements).
fn half_tensor(t: &Tensor) -> Result<Tensor> {
    let bits: Vec<u16> = t
        .to_vec()?
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    half_from_bits(&bits, t.dims(), t.device())
}

pub(crate) fn half_from_bits(bits: &[u16], shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut bits = bits.to_vec();
    if bits.len() % 2 == 1 {
        bits.push(0);
    }
    // Storage for upload: never a pooled buffer that recorded work may still write.
    let words = bits.len().div_ceil(2).max(1);
    let storage = Tensor::alloc_typed("to_half", &[words], DType::F16, device, true)?
        .with_layout(crate::shape::Layout::contiguous(shape));
    if !bits.is_empty() {
        device.upload(storage.buffer(), bytemuck::cast_slice(&bits));
    }
    Ok(storage)
}

impl InferenceModel {
    /// Optimises a captured or loaded graph.
    fn compile(device: Device, mut graph: Graph) -> Result<InferenceModel> {
        passes::optimize(&mut graph)?;
        device.synchronize()?;
        Ok(Self::from_graph(device, graph))
    }

    fn from_graph(device: Device, graph: Graph) -> InferenceModel {
        let precision = if graph.nodes.iter().any(|n| n.dtype == DType::F16) {
            Precision::F16
        } else {
            Precision::F32
        };
        InferenceModel {
            device,
            graph,
            plans: Mutex::new(PlanCache::default()),
            precision,
        }
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The element type of each weight and buffer the model holds: all [`DType::F16`] after
    /// [`InferenceModel::to_half`] (real f16 tensors, half the bytes), except constants that
    /// only ops without a half kernel read.
    pub fn weight_dtypes(&self) -> Vec<DType> {
        self.graph.consts.iter().map(|t| t.dtype()).collect()
    }

    /// Bytes of weights and buffers held.
    pub fn weight_bytes(&self) -> u64 {
        self.graph
            .consts
            .iter()
            .zip(&self.graph.const_dtypes)
            .map(|(t, d)| match d {
                DType::F16 => t.numel() as u64 * 2,
                _ => t.numel() as u64 * 4,
            })
            .sum()
    }

    /// The shape each input must have, the batch axis as a [`Dim`] with `per_batch` 1.
    ///
    /// ```
    /// # use kiln::nn::{Init, Sequential};
    /// # let dev = kiln::Device::default_device()?;
    /// # let net = Sequential::from_spec(&mut Init::new(&dev, 0), "linear(3,2)")?;
    /// let frozen = kiln::infer::freeze(net, &kiln::Tensor::ones(&[4, 3], &dev)?)?;
    /// let shape = &frozen.input_shapes()[0];
    /// assert!(shape[0].is_dynamic() && shape[1] == kiln::infer::Dim::fixed(3));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn input_shapes(&self) -> Vec<Vec<Dim>> {
        self.graph.inputs.iter().map(|i| i.shape.clone()).collect()
    }

    /// Number of nodes (after folding and fusion); every node but a view runs one kernel or
    /// a few.
    pub fn node_count(&self) -> usize {
        self.graph.nodes.len()
    }

    /// The graph, one node a line (op, operands, attributes, element type).
    pub fn describe(&self) -> String {
        self.graph.describe()
    }

    /// The element type of weights and activations.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The memory plan for inputs of `shapes` (made and cached on first use).
    pub fn memory_plan(&self, shapes: &[&[usize]]) -> Result<MemoryPlan> {
        let shapes: Vec<Vec<usize>> = shapes.iter().map(|s| s.to_vec()).collect();
        let p = self.plan(shapes)?;
        Ok(MemoryPlan {
            planned_bytes: p.planned_bytes,
            activation_bytes: p.activation_bytes,
        })
    }

    /// Forgets the cached plans (they are made again on the next call).
    pub fn clear_plans(&self) {
        *lock(&self.plans) = PlanCache::default();
    }

    /// Host bytes held by cached memory plans: at most [`PLAN_CACHE_BYTES`], however many
    /// batch sizes the model has seen.
    pub fn plan_cache_bytes(&self) -> usize {
        lock(&self.plans).bytes
    }

    fn plan(&self, shapes: Vec<Vec<usize>>) -> Result<Arc<plan::Plan>> {
        if let Some(p) = lock(&self.plans).get(&shapes) {
            return Ok(p);
        }
        let p = Arc::new(plan::make(
            &self.graph,
            &shapes,
            self.device.max_binding_bytes(),
        )?);
        lock(&self.plans).insert(shapes, p.clone());
        Ok(p)
    }

    /// The model's outputs for `inputs`. Every shape is checked on the CPU before any GPU
    /// work is recorded.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        self.run_observed(inputs, &mut |_, _| Ok(()))
    }

    /// [`InferenceModel::run`], calling `observe(i, operands)` before node `i` runs (for
    /// calibration).
    pub(crate) fn run_observed(
        &self,
        inputs: &[&Tensor],
        observe: &mut dyn FnMut(usize, &[&Tensor]) -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        const OP: &str = "InferenceModel::run";
        for x in inputs {
            if !x.device().same(&self.device) {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    a: format!("{:?}", x.device()),
                    b: format!("{:?}", self.device),
                });
            }
        }
        let plan = self.plan(inputs.iter().map(|t| t.shape()).collect())?;
        let _no_grad = crate::autograd::NoGradGuard::new();
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
        let g = &self.graph;
        let mut values: Vec<Option<Tensor>> = vec![None; g.nodes.len()];
        let missing =
            |i: usize| Error::invalid(OP, format!("internal: node {i} reads a freed value"));
        for (i, node) in g.nodes.iter().enumerate() {
            let mut ins: Vec<&Tensor> = Vec::with_capacity(node.inputs.len());
            for s in &node.inputs {
                ins.push(match *s {
                    Src::Input(k) => &inputs[k],
                    Src::Const(k) => &g.consts[k],
                    Src::Node(k) => values[k].as_ref().ok_or_else(|| missing(i))?,
                });
            }
            observe(i, &ins)?;
            let out = if node.dtype == DType::F16 || matches!(node.op, OpKind::Cast { .. }) {
                node.op.apply_half(&ins, &plan.shapes[i])?
            } else {
                node.op.apply(&ins, plan.n, &self.device)?
            };
            if out.dims() != plan.shapes[i] {
                return Err(Error::shape(
                    OP,
                    format!(
                        "internal: node {i} ({}) gave {:?}, the plan says {:?}",
                        node.op.name(),
                        out.dims(),
                        plan.shapes[i]
                    ),
                ));
            }
            values[i] = Some(out);
            for &k in &plan.frees[i] {
                values[k] = None;
            }
        }
        g.outputs
            .iter()
            .map(|s| match *s {
                Src::Input(k) => Ok(inputs[k].clone()),
                Src::Const(k) => Ok(g.consts[k].clone()),
                Src::Node(k) => values[k].clone().ok_or_else(|| missing(k)),
            })
            .collect()
    }

    /// The output of a model with one input and one output.
    ///
    /// ```
    /// # use kiln::nn::{Init, Sequential};
    /// # let dev = kiln::Device::default_device()?;
    /// # let net = Sequential::from_spec(&mut Init::new(&dev, 0), "linear(3,2) relu")?;
    /// let frozen = kiln::infer::freeze(net, &kiln::Tensor::ones(&[1, 3], &dev)?)?;
    /// let y = frozen.predict(&kiln::Tensor::ones(&[4, 3], &dev)?)?;
    /// assert_eq!(y.dims(), &[4, 2]);
    /// assert!(frozen.predict(&kiln::Tensor::ones(&[4, 5], &dev)?).is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = self.run(&[x])?;
        if out.len() != 1 {
            return Err(Error::invalid(
                "InferenceModel::predict",
                format!("the model has {} outputs: use run", out.len()),
            ));
        }
        Ok(out.remove(0))
    }

    /// Class predictions (argmax of the last axis) for a batch, read back to the host.
    pub fn classify(&self, x: &Tensor) -> Result<Vec<usize>> {
        let logits = self.predict(x)?;
        Ok(logits
            .argmax(-1, false)?
            .to_vec()?
            .into_iter()
            .map(|v| v as usize)
            .collect())
    }

    /// The same model with f16 weights and activations (f32 arithmetic inside the kernels):
    /// half the memory. Ops without a half-precision kernel run in f32 between
    /// conversions, so every graph converts. `Err` when the adapter lacks `SHADER_F16`.
    pub fn to_half(self) -> Result<InferenceModel> {
        const OP: &str = "InferenceModel::to_half";
        if !self.device.features().contains(wgpu::Features::SHADER_F16) {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} has no SHADER_F16 feature: use the f32 model",
                    self.device.name()
                ),
            ));
        }
        if self.precision == Precision::F16 {
            return Ok(self);
        }
        if self
            .graph
            .nodes
            .iter()
            .any(|n| n.op.output_dtype().is_some())
        {
            return Err(Error::invalid(OP, "the model is quantized to int8 already"));
        }
        let mut g = self.graph;
        let mut nodes: Vec<Node> = Vec::with_capacity(g.nodes.len());
        let mut map: Vec<Src> = Vec::with_capacity(g.nodes.len());
        let mut casts: HashMap<(Src, bool), Src> = HashMap::new();
        let mut half_consts: HashMap<usize, usize> = HashMap::new();
        let old_consts = g.consts.len();
        let dtype_of = |s: Src, nodes: &[Node], g: &Graph| match s {
            Src::Input(_) => DType::F32,
            Src::Const(k) => g.const_dtypes[k],
            Src::Node(k) => nodes[k].dtype,
        };
        let shape_of = |s: Src, nodes: &[Node], g: &Graph| -> Vec<Dim> {
            match s {
                Src::Input(k) => g.inputs[k].shape.clone(),
                Src::Const(k) => g.consts[k].dims().iter().map(|&d| Dim::fixed(d)).collect(),
                Src::Node(k) => nodes[k].shape.clone(),
            }
        };
        for node in std::mem::take(&mut g.nodes) {
            if matches!(node.op, OpKind::Cast { .. }) {
                // Conversions already in the graph go: the rewrite places its own.
                let s = match node.inputs[0] {
                    Src::Node(k) => map[k],
                    other => other,
                };
                map.push(s);
                continue;
            }
            let half = node.op.has_half_kernel();
            let want = if half { DType::F16 } else { DType::F32 };
            let mut inputs = Vec::with_capacity(node.inputs.len());
            for s in &node.inputs {
                let s = match *s {
                    Src::Node(k) => map[k],
                    other => other,
                };
                let have = dtype_of(s, &nodes, &g);
                if have == want {
                    inputs.push(s);
                    continue;
                }
                let converted = match s {
                    Src::Const(k) if k < old_consts && want == DType::F16 => {
                        let h = match half_consts.get(&k) {
                            Some(&h) => h,
                            None => {
                                g.consts.push(half_tensor(&g.consts[k])?);
                                g.const_dtypes.push(DType::F16);
                                half_consts.insert(k, g.consts.len() - 1);
                                g.consts.len() - 1
                            }
                        };
                        Src::Const(h)
                    }
                    _ => *casts.entry((s, half)).or_insert_with(|| {
                        let shape = shape_of(s, &nodes, &g);
                        nodes.push(Node {
                            op: OpKind::Cast { to: want },
                            inputs: vec![s],
                            shape,
                            dtype: want,
                        });
                        Src::Node(nodes.len() - 1)
                    }),
                };
                inputs.push(converted);
            }
            nodes.push(Node {
                inputs,
                dtype: want,
                ..node
            });
            map.push(Src::Node(nodes.len() - 1));
        }
        let outputs = std::mem::take(&mut g.outputs);
        for s in outputs {
            let s = match s {
                Src::Node(k) => map[k],
                other => other,
            };
            let s = match s {
                Src::Node(_) | Src::Const(_) if dtype_of(s, &nodes, &g) == DType::F16 => {
                    let shape = shape_of(s, &nodes, &g);
                    nodes.push(Node {
                        op: OpKind::Cast { to: DType::F32 },
                        inputs: vec![s],
                        shape,
                        dtype: DType::F32,
                    });
                    Src::Node(nodes.len() - 1)
                }
                other => other,
            };
            g.outputs.push(s);
        }
        g.nodes = nodes;
        passes::eliminate_dead(&mut g);
        self.device.synchronize()?;
        // from_graph sets the precision from the nodes: f32 when no op has a half kernel.
        Ok(Self::from_graph(self.device, g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(nodes: usize) -> Arc<plan::Plan> {
        Arc::new(plan::Plan {
            n: 1,
            shapes: vec![vec![1, 2, 3, 4]; nodes],
            frees: vec![Vec::new(); nodes],
            planned_bytes: 0,
            activation_bytes: 0,
        })
    }

    #[test]
    fn plan_cache_is_lru_and_bounded_by_bytes() {
        let mut c = PlanCache::default();
        let big = plan(4000);
        let per = big.host_bytes();
        let fits = PLAN_CACHE_BYTES / per;
        assert!(fits >= 3, "{per} bytes per plan");
        for b in 0..fits * 3 {
            c.insert(vec![vec![b]], big.clone());
            // Batch 0 stays in use, so it is never the least recently used.
            assert!(c.get(&[vec![0]]).is_some(), "batch 0 evicted at {b}");
            assert!(c.bytes <= PLAN_CACHE_BYTES);
        }
        assert_eq!(c.plans.len(), fits);
        assert_eq!(c.bytes, fits * per);
        // The newest plans are there, the oldest unused ones are gone.
        assert!(c.get(&[vec![fits * 3 - 1]]).is_some());
        assert!(c.get(&[vec![1]]).is_none());
    }
}
