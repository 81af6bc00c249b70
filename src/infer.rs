//! Frozen inference: a model that holds only weights and buffers, runs the training module's
//! kernels, folds batch norm into the preceding convolution or linear layer, fuses bias and
//! activation into the producing kernel, and plans its activation memory once per input shape.
//!
//! Build one with [`freeze`] from a trained [`Sequential`], or with [`InferenceModel::load`]
//! from a checkpoint (and its architecture description) without any training code.
//!
//! ```
//! use kiln::nn::{Init, Module, Sequential};
//! # let dev = kiln::Device::default_device()?;
//! let spec = "conv2d(1,4,3,p=1) batchnorm2d(4) relu maxpool2d(2) flatten linear(64,10)";
//! let model = Sequential::from_spec(&mut Init::new(&dev, 0), spec)?;
//! let frozen = kiln::infer::freeze(model)?;
//! let x = kiln::Tensor::randn(&[2, 1, 8, 8], 1, &dev)?;
//! assert_eq!(frozen.predict(&x)?.dims(), &[2, 10]);
//! # Ok::<(), kiln::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use crate::autograd::no_grad;
use crate::checkpoint::StoredTensor;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::{Kernel, Variant};
use crate::nn::{LayerKind, Module, Sequential};
use crate::ops::conv::{conv2d_geometry, conv_fwd_into, Conv2dOptions, ConvTranspose2dOptions};
use crate::ops::elementwise::{copy_into, launch_variant, Extra, UnaryOp};
use crate::ops::matmul::matmul_into;
use crate::ops::pool::{
    adaptive_geometry, geometry, pool_into, Pool2dOptions, MODE_AVG_VALID, MODE_AVG_WITH_PAD,
    MODE_MAX,
};
use crate::ops::Epilogue;
use crate::shape::Layout;
use crate::spec::LayerSpec;
use crate::tensor::Tensor;

/// A layer as read from a trained module or a checkpoint, before folding and fusion.
enum RawLayer {
    Linear {
        w: Tensor,
        b: Option<Tensor>,
    },
    Conv2d {
        w: Tensor,
        b: Option<Tensor>,
        opts: Conv2dOptions,
    },
    ConvTranspose2d {
        w: Tensor,
        b: Option<Tensor>,
        opts: ConvTranspose2dOptions,
    },
    BatchNorm {
        w: Option<Tensor>,
        b: Option<Tensor>,
        mean: Tensor,
        var: Tensor,
        eps: f32,
    },
    LayerNorm {
        shape: Vec<usize>,
        w: Option<Tensor>,
        b: Option<Tensor>,
        eps: f32,
    },
    Pool {
        opts: Pool2dOptions,
        max: bool,
    },
    AdaptiveAvgPool([usize; 2]),
    Flatten(isize, isize),
    Activation(UnaryOp, f32),
    Embedding(Tensor),
    Identity,
}

/// A layer ready to run.
enum Frozen {
    /// `act(x W^T + b)` in one matmul dispatch.
    Linear {
        w: Tensor,
        b: Option<Tensor>,
        act: Option<(UnaryOp, f32)>,
    },
    /// `act(conv2d(x, w) + b)` in one conv dispatch.
    Conv2d {
        w: Tensor,
        b: Option<Tensor>,
        opts: Conv2dOptions,
        act: Option<(UnaryOp, f32)>,
    },
    ConvTranspose2d {
        w: Tensor,
        b: Option<Tensor>,
        opts: ConvTranspose2dOptions,
    },
    /// Batch norm that could not be folded: `x * scale + shift` per channel (axis 1).
    Affine {
        scale: Tensor,
        shift: Tensor,
    },
    LayerNorm {
        shape: Vec<usize>,
        w: Option<Tensor>,
        b: Option<Tensor>,
        eps: f32,
    },
    Pool {
        opts: Pool2dOptions,
        max: bool,
    },
    AdaptiveAvgPool([usize; 2]),
    Flatten(isize, isize),
    Activation(UnaryOp, f32),
    Embedding(Tensor),
}

/// Activation buffers for one input shape: two, used in turn.
struct Plan {
    buffers: [Tensor; 2],
}

/// A frozen model: weights and buffers as plain tensors, no graph, no gradients, no optimizer
/// state, no dropout.
///
/// Safe to share between threads: each call records its work while holding the plan of its
/// input shape, so concurrent calls of one shape run one after the other on the GPU and never
/// see each other's activations.
pub struct InferenceModel {
    device: Device,
    layers: Vec<Frozen>,
    plans: Mutex<HashMap<Vec<usize>, Plan>>,
    precision: Precision,
}

/// Element type of an inference model's weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    F32,
    /// 16-bit floats in memory, f32 arithmetic inside the kernels (needs `SHADER_F16`).
    F16,
}

impl Precision {
    fn variant(self) -> Variant {
        match self {
            Precision::F32 => Variant::F32,
            Precision::F16 => Variant::F16,
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }
}

/// A tensor of `shape` holding `values` as f16, for the half-precision kernels only: its
/// storage is sized for halves, its layout counts elements.
fn half_tensor(t: &Tensor) -> Result<Tensor> {
    let values = t.to_vec()?;
    let mut bits: Vec<u16> = values
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    if bits.len() % 2 == 1 {
        bits.push(0);
    }
    let storage = Tensor::alloc("to_half", &[bits.len() / 2], t.device(), true)?;
    t.device()
        .upload(storage.buffer(), bytemuck::cast_slice(&bits));
    Ok(storage.with_layout(Layout::contiguous(t.dims())))
}

/// Storage for `n` elements of `precision`, viewed as a flat tensor of `n` elements.
fn activation_buffer(n: usize, precision: Precision, device: &Device) -> Result<Tensor> {
    let units = match precision {
        Precision::F32 => n,
        Precision::F16 => n.div_ceil(2),
    };
    Ok(Tensor::uninit("InferenceModel", &[units.max(1)], device)?
        .with_layout(Layout::contiguous(&[n])))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Freezes a trained network for inference (consumes it; drop its optimizer too so that no
/// gradient or optimizer buffer stays alive).
pub fn freeze(model: Sequential) -> Result<InferenceModel> {
    let device = model
        .parameters()
        .first()
        .map(|p| p.device().clone())
        .map(Ok)
        .unwrap_or_else(Device::default_device)?;
    let mut raw = Vec::new();
    collect(&model, &mut raw)?;
    drop(model);
    InferenceModel::compile(device, raw)
}

fn collect(m: &dyn Module, out: &mut Vec<RawLayer>) -> Result<()> {
    let d = |t: &Tensor| t.detach();
    let od = |t: &Option<Tensor>| t.as_ref().map(Tensor::detach);
    match m.kind() {
        LayerKind::Sequential(s) => {
            for (_, c) in s.children() {
                collect(c, out)?;
            }
        }
        LayerKind::Linear(l) => out.push(RawLayer::Linear {
            w: d(&l.weight),
            b: od(&l.bias),
        }),
        LayerKind::Conv2d(c) => out.push(RawLayer::Conv2d {
            w: d(&c.weight),
            b: od(&c.bias),
            opts: c.options,
        }),
        LayerKind::ConvTranspose2d(c) => out.push(RawLayer::ConvTranspose2d {
            w: d(&c.weight),
            b: od(&c.bias),
            opts: c.options,
        }),
        LayerKind::BatchNorm(b) => out.push(RawLayer::BatchNorm {
            w: od(&b.weight),
            b: od(&b.bias),
            mean: d(&b.running_mean),
            var: d(&b.running_var),
            eps: b.eps,
        }),
        LayerKind::LayerNorm(l) => out.push(RawLayer::LayerNorm {
            shape: l.normalized_shape.clone(),
            w: od(&l.weight),
            b: od(&l.bias),
            eps: l.eps,
        }),
        LayerKind::Embedding(e) => out.push(RawLayer::Embedding(d(&e.weight))),
        LayerKind::Activation(op, a) => out.push(RawLayer::Activation(op, a)),
        LayerKind::Pool(opts, max) => out.push(RawLayer::Pool { opts, max }),
        LayerKind::AdaptiveAvgPool(s) => out.push(RawLayer::AdaptiveAvgPool(s)),
        LayerKind::Flatten(s, e) => out.push(RawLayer::Flatten(s, e)),
        LayerKind::Dropout => out.push(RawLayer::Identity),
        LayerKind::Other => {
            return Err(Error::invalid(
                "freeze",
                format!("cannot freeze the custom module {}", m.describe()),
            ));
        }
    }
    Ok(())
}

/// Per-channel `scale` and `shift` of an eval-mode batch norm.
fn bn_affine(
    w: &Option<Tensor>,
    b: &Option<Tensor>,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let inv = var.add_scalar(eps)?.rsqrt()?;
    let scale = match w {
        Some(w) => inv.mul(w)?,
        None => inv,
    };
    let shift = mean.mul(&scale)?.neg()?;
    let shift = match b {
        Some(b) => shift.add(b)?,
        None => shift,
    };
    Ok((scale, shift))
}

/// `w * scale` along the output channels (axis 0) and `b * scale + shift`.
fn fold(
    w: &Tensor,
    b: &Option<Tensor>,
    scale: &Tensor,
    shift: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let mut s_shape = vec![1usize; w.rank()];
    s_shape[0] = scale.numel();
    let w2 = w.mul(&scale.reshape_to(&s_shape)?)?;
    let b2 = match b {
        Some(b) => b.mul(scale)?.add(shift)?,
        None => shift.clone(),
    };
    Ok((w2, b2))
}

impl InferenceModel {
    /// Folds batch norms into the convolution or linear layer before them and fuses each
    /// activation into the producing kernel when it directly follows one.
    fn compile(device: Device, raw: Vec<RawLayer>) -> Result<InferenceModel> {
        no_grad(|| {
            let mut layers: Vec<Frozen> = Vec::new();
            for layer in raw {
                match layer {
                    RawLayer::Identity => {}
                    RawLayer::Linear { w, b } => layers.push(Frozen::Linear { w, b, act: None }),
                    RawLayer::Conv2d { w, b, opts } => layers.push(Frozen::Conv2d {
                        w,
                        b,
                        opts,
                        act: None,
                    }),
                    RawLayer::ConvTranspose2d { w, b, opts } => {
                        layers.push(Frozen::ConvTranspose2d { w, b, opts })
                    }
                    RawLayer::BatchNorm {
                        w,
                        b,
                        mean,
                        var,
                        eps,
                    } => {
                        let (scale, shift) = bn_affine(&w, &b, &mean, &var, eps)?;
                        match layers.last_mut() {
                            Some(Frozen::Linear { w, b, act: None })
                            | Some(Frozen::Conv2d {
                                w, b, act: None, ..
                            }) => {
                                let (w2, b2) = fold(w, b, &scale, &shift)?;
                                *w = w2;
                                *b = Some(b2);
                            }
                            _ => layers.push(Frozen::Affine { scale, shift }),
                        }
                    }
                    RawLayer::Activation(op, alpha) => match layers.last_mut() {
                        Some(Frozen::Linear {
                            act: act @ None, ..
                        })
                        | Some(Frozen::Conv2d {
                            act: act @ None, ..
                        }) => {
                            *act = Some((op, alpha));
                        }
                        _ => layers.push(Frozen::Activation(op, alpha)),
                    },
                    RawLayer::LayerNorm { shape, w, b, eps } => {
                        layers.push(Frozen::LayerNorm { shape, w, b, eps })
                    }
                    RawLayer::Pool { opts, max } => layers.push(Frozen::Pool { opts, max }),
                    RawLayer::AdaptiveAvgPool(s) => layers.push(Frozen::AdaptiveAvgPool(s)),
                    RawLayer::Flatten(s, e) => layers.push(Frozen::Flatten(s, e)),
                    RawLayer::Embedding(w) => layers.push(Frozen::Embedding(w)),
                }
            }
            // Folding made new tensors: make sure every weight is materialised once.
            device.synchronize()?;
            Ok(InferenceModel {
                device,
                layers,
                plans: Mutex::new(HashMap::new()),
                precision: Precision::F32,
            })
        })
    }

    /// A model from an architecture description ([`crate::spec`]) and a checkpoint holding its
    /// tensors under `torch.nn.Sequential` names (`0.weight`, ...). With `spec = None`, the
    /// description stored in the checkpoint is used. A tensor that is missing, extra or of
    /// the wrong shape is an error naming it; so is a truncated or corrupt file.
    pub fn load(path: &Path, spec: Option<&str>, device: &Device) -> Result<InferenceModel> {
        let stored = crate::checkpoint::read(path)?;
        let spec = match spec {
            Some(s) => s.to_string(),
            None => crate::checkpoint::read_spec(path)?.ok_or_else(|| {
                Error::invalid(
                    "InferenceModel::load",
                    format!(
                        "{} holds no architecture description: pass one",
                        path.display()
                    ),
                )
            })?,
        };
        Self::from_stored(&spec, &stored, device)
    }

    /// [`InferenceModel::load`] from tensors already read.
    pub fn from_stored(
        spec: &str,
        stored: &BTreeMap<String, StoredTensor>,
        device: &Device,
    ) -> Result<InferenceModel> {
        const OP: &str = "InferenceModel::load";
        let used = std::cell::RefCell::new(std::collections::HashSet::new());
        let take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let s = stored.get(&name).ok_or_else(|| {
                Error::invalid(OP, format!("tensor {name} is missing from the checkpoint"))
            })?;
            if s.shape != shape {
                return Err(Error::shape(OP, format!("tensor {name} has shape {:?} in the checkpoint, the architecture needs {shape:?}", s.shape)));
            }
            used.borrow_mut().insert(name);
            Tensor::from_slice(&s.values, &s.shape, device)
        };
        let mut raw = Vec::new();
        for (i, layer) in crate::spec::parse(spec)?.into_iter().enumerate() {
            let p = |n: &str| format!("{i}.{n}");
            let conv = layer.conv2d_options();
            let transposed = layer.conv_transpose2d_options();
            let pool = layer.pool_options();
            raw.push(match layer {
                LayerSpec::Linear {
                    in_features,
                    out_features,
                    bias,
                } => RawLayer::Linear {
                    w: take(p("weight"), &[out_features, in_features])?,
                    b: if bias {
                        Some(take(p("bias"), &[out_features])?)
                    } else {
                        None
                    },
                },
                LayerSpec::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    groups,
                    bias,
                    ..
                } => RawLayer::Conv2d {
                    w: take(
                        p("weight"),
                        &[out_channels, in_channels / groups.max(1), kernel, kernel],
                    )?,
                    b: if bias {
                        Some(take(p("bias"), &[out_channels])?)
                    } else {
                        None
                    },
                    opts: conv.unwrap_or_default(),
                },
                LayerSpec::ConvTranspose2d {
                    in_channels,
                    out_channels,
                    kernel,
                    groups,
                    bias,
                    ..
                } => RawLayer::ConvTranspose2d {
                    w: take(
                        p("weight"),
                        &[in_channels, out_channels / groups.max(1), kernel, kernel],
                    )?,
                    b: if bias {
                        Some(take(p("bias"), &[out_channels])?)
                    } else {
                        None
                    },
                    opts: transposed.unwrap_or_default(),
                },
                LayerSpec::BatchNorm { channels, eps, .. } => {
                    // The step counter is training state: accepted, not needed.
                    if stored.contains_key(&p("num_batches_tracked")) {
                        used.borrow_mut().insert(p("num_batches_tracked"));
                    }
                    RawLayer::BatchNorm {
                        w: Some(take(p("weight"), &[channels])?),
                        b: Some(take(p("bias"), &[channels])?),
                        mean: take(p("running_mean"), &[channels])?,
                        var: take(p("running_var"), &[channels])?,
                        eps,
                    }
                }
                LayerSpec::LayerNorm { shape, eps } => RawLayer::LayerNorm {
                    w: Some(take(p("weight"), &shape)?),
                    b: Some(take(p("bias"), &shape)?),
                    shape,
                    eps,
                },
                LayerSpec::Embedding { count, dim } => {
                    RawLayer::Embedding(take(p("weight"), &[count, dim])?)
                }
                LayerSpec::Pool { max, kernel, .. } => RawLayer::Pool {
                    opts: pool.unwrap_or_else(|| Pool2dOptions::new([kernel; 2])),
                    max,
                },
                LayerSpec::AdaptiveAvgPool { size } => RawLayer::AdaptiveAvgPool(size),
                LayerSpec::Flatten { start, end } => RawLayer::Flatten(start, end),
                LayerSpec::Dropout { .. } => RawLayer::Identity,
                LayerSpec::Activation { op, slope } => RawLayer::Activation(op, slope),
            });
        }
        let used = used.into_inner();
        if let Some(extra) = stored
            .keys()
            .find(|k| !used.contains(*k) && !k.starts_with("optimizer."))
        {
            return Err(Error::invalid(
                OP,
                format!("tensor {extra} in the checkpoint is not in the architecture"),
            ));
        }
        Self::compile(device.clone(), raw)
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights and buffers held.
    pub fn weight_bytes(&self) -> u64 {
        let t = |t: &Tensor| t.numel() as u64 * self.precision.bytes();
        let o = |x: &Option<Tensor>| x.as_ref().map_or(0, t);
        self.layers
            .iter()
            .map(|l| match l {
                Frozen::Linear { w, b, .. }
                | Frozen::Conv2d { w, b, .. }
                | Frozen::ConvTranspose2d { w, b, .. } => t(w) + o(b),
                Frozen::Affine { scale, shift } => t(scale) + t(shift),
                Frozen::LayerNorm { w, b, .. } => o(w) + o(b),
                Frozen::Embedding(w) => t(w),
                _ => 0,
            })
            .sum()
    }

    /// Number of kernels (layers after folding and fusion) a forward pass runs.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Output shape of each layer for an input of `shape`, checking the input against every
    /// layer on the CPU.
    fn shapes(&self, input: &[usize]) -> Result<Vec<Vec<usize>>> {
        let mut shapes = Vec::with_capacity(self.layers.len());
        let mut s = input.to_vec();
        for (i, l) in self.layers.iter().enumerate() {
            let err = |msg: String| Error::shape("InferenceModel", format!("layer {i}: {msg}"));
            s = match l {
                Frozen::Linear { w, .. } => {
                    if s.last() != Some(&w.dims()[1]) {
                        return Err(err(format!(
                            "input {s:?} must end in {} features",
                            w.dims()[1]
                        )));
                    }
                    let mut o = s.clone();
                    *o.last_mut().unwrap_or(&mut 0) = w.dims()[0];
                    o
                }
                Frozen::Conv2d { w, opts, .. } => {
                    let g = conv2d_geometry(&s, w.dims(), opts).map_err(|e| err(e.to_string()))?;
                    vec![g.n, g.c_out, g.oh, g.ow]
                }
                Frozen::ConvTranspose2d { w, b, opts } => {
                    let probe = Tensor::zeros(&s, &self.device)
                        .and_then(|z| z.conv_transpose2d(w, b.as_ref(), opts))
                        .map_err(|e| err(e.to_string()))?;
                    probe.shape()
                }
                Frozen::Affine { scale, .. } => {
                    if s.len() < 2 || s[1] != scale.numel() {
                        return Err(err(format!(
                            "input {s:?} must have {} channels on axis 1",
                            scale.numel()
                        )));
                    }
                    s.clone()
                }
                Frozen::LayerNorm { shape, .. } => {
                    if s.len() < shape.len() || s[s.len() - shape.len()..] != shape[..] {
                        return Err(err(format!("input {s:?} must end in {shape:?}")));
                    }
                    s.clone()
                }
                Frozen::Pool { opts, max } => {
                    let mode = if *max { MODE_MAX } else { MODE_AVG_WITH_PAD };
                    let g = geometry("pool2d", &s, opts, mode).map_err(|e| err(e.to_string()))?;
                    vec![g.n, g.c, g.oh, g.ow]
                }
                Frozen::AdaptiveAvgPool(size) => {
                    if s.len() != 4 || s[2] == 0 || s[3] == 0 {
                        return Err(err(format!("input {s:?} must be (N, C, H, W)")));
                    }
                    vec![s[0], s[1], size[0], size[1]]
                }
                Frozen::Flatten(start, end) => {
                    let rank = s.len() as isize;
                    let a = if *start < 0 { start + rank } else { *start };
                    let b = if *end < 0 { end + rank } else { *end };
                    if a < 0 || b >= rank || a > b {
                        return Err(err(format!("cannot flatten axes {start}..={end} of {s:?}")));
                    }
                    let (a, b) = (a as usize, b as usize);
                    let mut o = s[..a].to_vec();
                    o.push(s[a..=b].iter().product());
                    o.extend(&s[b + 1..]);
                    o
                }
                Frozen::Activation(..) => s.clone(),
                Frozen::Embedding(w) => {
                    let mut o = s.clone();
                    o.push(w.dims()[1]);
                    o
                }
            };
            shapes.push(s.clone());
        }
        Ok(shapes)
    }

    /// The model's output for a batch `x` (a new tensor; the activations stay in the plan).
    ///
    /// ```
    /// # use kiln::nn::{Init, Sequential};
    /// # let dev = kiln::Device::default_device()?;
    /// # let frozen = kiln::infer::freeze(Sequential::from_spec(&mut Init::new(&dev, 0), "linear(3,2) relu")?)?;
    /// let y = frozen.predict(&kiln::Tensor::ones(&[4, 3], &dev)?)?;
    /// assert_eq!(y.dims(), &[4, 2]);
    /// assert!(frozen.predict(&kiln::Tensor::ones(&[4, 5], &dev)?).is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().same(&self.device) {
            return Err(Error::DeviceMismatch {
                op: "InferenceModel::predict",
                a: format!("{:?}", x.device()),
                b: format!("{:?}", self.device),
            });
        }
        let x = x.detach().contiguous()?;
        let shapes = self.shapes(x.dims())?;
        let Some(out_shape) = shapes.last() else {
            return Ok(x);
        };
        let half = self.precision == Precision::F16;
        let mut plans = lock(&self.plans);
        if !plans.contains_key(x.dims()) {
            // Two buffers used in turn; in half precision the input is converted into one.
            let input = if half { x.numel() } else { 0 };
            let max = shapes
                .iter()
                .map(|s| s.iter().product::<usize>())
                .fold(input, usize::max)
                .max(1);
            let plan = Plan {
                buffers: [
                    activation_buffer(max, self.precision, &self.device)?,
                    activation_buffer(max, self.precision, &self.device)?,
                ],
            };
            plans.insert(x.shape(), plan);
        }
        let plan = plans
            .get(x.dims())
            .ok_or_else(|| Error::invalid("InferenceModel::predict", "internal: no plan"))?;
        let view = |slot: usize, shape: &[usize]| {
            plan.buffers[slot].with_layout(Layout::contiguous(shape))
        };
        let mut current = x.clone();
        let mut slot = 0;
        if half {
            let staged = view(0, x.dims());
            launch_variant(
                Kernel::UnaryFwd,
                Variant::F32ToF16,
                &[(&x, &x.layout)],
                &staged,
                &staged.layout.clone(),
                Extra::default(),
            )?;
            current = staged;
            slot = 1;
        }
        for (layer, shape) in self.layers.iter().zip(&shapes) {
            let out = view(slot, shape);
            let produced = self.run(layer, &current, &out, shape)?;
            if produced {
                current = out;
                slot = 1 - slot;
            } else {
                current = current.with_layout(Layout::contiguous(shape));
            }
        }
        let result = Tensor::uninit("InferenceModel::predict", out_shape, &self.device)?;
        let variant = if half {
            Variant::F16ToF32
        } else {
            Variant::F32
        };
        launch_variant(
            Kernel::UnaryFwd,
            variant,
            &[(&current, &current.layout)],
            &result,
            &result.layout.clone(),
            Extra::default(),
        )?;
        Ok(result)
    }

    /// The same model with f16 weights and activations (f32 arithmetic inside the kernels):
    /// half the memory. `Err` when the adapter lacks `SHADER_F16` (keep the f32 model then),
    /// or for layers without a half-precision path (transposed convolution, layer norm,
    /// embedding, a batch norm that could not be folded).
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
        let h = |t: &Tensor| half_tensor(t);
        let oh = |t: &Option<Tensor>| t.as_ref().map(half_tensor).transpose();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.into_iter().enumerate() {
            layers.push(match l {
                Frozen::Linear { w, b, act } => Frozen::Linear {
                    w: h(&w)?,
                    b: oh(&b)?,
                    act,
                },
                Frozen::Conv2d { w, b, opts, act } => Frozen::Conv2d {
                    w: h(&w)?,
                    b: oh(&b)?,
                    opts,
                    act,
                },
                l @ (Frozen::Pool { .. }
                | Frozen::AdaptiveAvgPool(_)
                | Frozen::Flatten(..)
                | Frozen::Activation(..)) => l,
                _ => {
                    return Err(Error::invalid(
                        OP,
                        format!("layer {i} has no half-precision kernel path"),
                    ))
                }
            });
        }
        self.device.synchronize()?;
        Ok(InferenceModel {
            device: self.device,
            layers,
            plans: Mutex::new(HashMap::new()),
            precision: Precision::F16,
        })
    }

    /// The element type of weights and activations.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Runs one layer from `x` into `out`; `false` when the layer only reshapes (no data moves).
    fn run(&self, layer: &Frozen, x: &Tensor, out: &Tensor, shape: &[usize]) -> Result<bool> {
        match layer {
            Frozen::Linear { w, b, act } => {
                let inner = *x.dims().last().unwrap_or(&1);
                let rows = x.numel() / inner.max(1);
                let x2 = x.with_layout(Layout::contiguous(&[rows, inner]));
                let o2 = out.with_layout(Layout::contiguous(&[rows, w.dims()[0]]));
                matmul_into(
                    &x2,
                    &w.t()?,
                    &o2,
                    &Epilogue {
                        bias: b.as_ref(),
                        activation: *act,
                        variant: self.precision.variant(),
                    },
                )?;
            }
            Frozen::Conv2d { w, b, opts, act } => {
                let g = conv2d_geometry(x.dims(), w.dims(), opts)?;
                conv_fwd_into(
                    x,
                    w,
                    &g,
                    out,
                    &Epilogue {
                        bias: b.as_ref(),
                        activation: *act,
                        variant: self.precision.variant(),
                    },
                )?;
            }
            Frozen::ConvTranspose2d { w, b, opts } => {
                let y = x.conv_transpose2d(w, b.as_ref(), opts)?;
                copy_into(&y, out, &out.layout.clone())?;
            }
            Frozen::Affine { scale, shift } => {
                // Rare (a batch norm not after a conv or linear layer): plain ops, then copy.
                let mut cshape = vec![1; shape.len()];
                cshape[1] = scale.numel();
                let y = x
                    .mul(&scale.reshape_to(&cshape)?)?
                    .add(&shift.reshape_to(&cshape)?)?;
                copy_into(&y, out, &out.layout.clone())?;
            }
            Frozen::LayerNorm {
                shape: ns,
                w,
                b,
                eps,
            } => {
                let y = x.layer_norm(ns, w.as_ref(), b.as_ref(), *eps)?;
                copy_into(&y, out, &out.layout.clone())?;
            }
            Frozen::Pool { opts, max } => {
                let mode = if *max {
                    MODE_MAX
                } else if opts.count_include_pad {
                    MODE_AVG_WITH_PAD
                } else {
                    MODE_AVG_VALID
                };
                let g = geometry("pool2d", x.dims(), opts, mode)?;
                pool_into(x, out, &g, self.precision.variant())?;
            }
            Frozen::AdaptiveAvgPool(size) => pool_into(
                x,
                out,
                &adaptive_geometry(x.dims(), *size),
                self.precision.variant(),
            )?,
            Frozen::Flatten(..) => return Ok(false),
            Frozen::Activation(op, alpha) => {
                let e = Extra {
                    op: *op as u32,
                    alpha: *alpha,
                    ..Default::default()
                };
                launch_variant(
                    Kernel::UnaryFwd,
                    self.precision.variant(),
                    &[(x, &x.layout)],
                    out,
                    &out.layout.clone(),
                    e,
                )?;
            }
            Frozen::Embedding(w) => {
                let y = w.index_select(0, &x.reshape(&[-1])?)?;
                copy_into(&y.reshape_to(shape)?, out, &out.layout.clone())?;
            }
        }
        Ok(true)
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

    /// Releases the planned activation buffers (they are re-planned on the next call).
    pub fn clear_plans(&self) {
        lock(&self.plans).clear();
    }

    /// Bytes of planned activation buffers held now.
    pub fn planned_bytes(&self) -> u64 {
        lock(&self.plans)
            .values()
            .map(|p| {
                p.buffers
                    .iter()
                    .map(|b| b.numel() as u64 * self.precision.bytes())
                    .sum::<u64>()
            })
            .sum()
    }
}
