//! Layers and the [`Module`] trait: named parameters and buffers (PyTorch `state_dict` names
//! such as `features.0.weight`), train/eval mode, and PyTorch's default initialisations,
//! seeded through [`Init`].

mod blocks;
mod config;
mod layers;

pub use blocks::{
    causal_mask, Activation, Conv1d, GroupNorm, Gru, Identity, Lstm, ModuleList,
    MultiheadAttention, TransformerEncoderLayer,
};
pub use config::{
    Conv1dConfig, Conv2dConfig, EmbeddingConfig, LayerNormConfig, LinearConfig,
    MultiheadAttentionConfig, RnnConfig, TransformerEncoderLayerConfig,
};
pub use layers::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm, Conv2d, ConvTranspose2d, Dropout, Embedding, Flatten,
    Gelu, LayerNorm, LeakyRelu, Linear, MaxPool2d, Relu, Residual, Sigmoid, Silu, Tanh,
};

/// Derives [`Module`] from a struct's fields: see the `kiln-derive` crate.
///
/// ```
/// use kiln::nn::{Init, Linear, Module};
/// use kiln::Tensor;
///
/// #[derive(Module)]
/// struct Mlp {
///     hidden: Linear,
///     out: Linear,
///     scale: Tensor,
///     dropout_p: f32, // configuration: not a tensor, not visited
/// }
///
/// impl Mlp {
///     fn forward(&self, x: &Tensor) -> kiln::Result<Tensor> {
///         self.out.forward(&self.hidden.forward(x)?.relu()?)?.mul(&self.scale)
///     }
/// }
///
/// # let dev = kiln::Device::default_device()?;
/// let mut init = Init::new(&dev, 0);
/// let m = Mlp {
///     hidden: Linear::new(&mut init, 4, 8, true)?,
///     out: Linear::new(&mut init, 8, 2, true)?,
///     scale: Tensor::ones(&[2], &dev)?.requires_grad(),
///     dropout_p: 0.0,
/// };
/// let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["hidden.weight", "hidden.bias", "out.weight", "out.bias", "scale"]);
/// assert_eq!(Module::forward(&m, &Tensor::ones(&[3, 4], &dev)?)?.dims(), &[3, 2]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub use kiln_derive::Module;

use crate::device::Device;
use crate::error::Result;
use crate::tensor::Tensor;

/// What a named tensor of a module is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// A trainable parameter (a leaf that requires grad).
    Parameter,
    /// State that is saved but not trained (running statistics, counters).
    Buffer,
}

/// A layer or a network of layers.
///
/// ```
/// use kiln::nn::{Init, Linear, Module, Relu, Sequential};
/// # let dev = kiln::Device::default_device()?;
/// let mut init = Init::new(&dev, 0);
/// let net = Sequential::new()
///     .add(Linear::new(&mut init, 4, 8, true)?)
///     .add(Relu)
///     .add(Linear::new(&mut init, 8, 2, true)?);
/// let names: Vec<String> = net.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
/// let y = net.forward(&kiln::Tensor::ones(&[3, 4], &dev)?)?;
/// assert_eq!(y.dims(), &[3, 2]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub trait Module: Send + Sync {
    /// Applies the module.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The elementwise activation this module is, if it is one ([`Sequential`] offers it to
    /// the module before, to fuse).
    #[doc(hidden)]
    fn activation(&self) -> Option<crate::UnaryOp> {
        None
    }

    /// `act(self.forward(x))` in one pass, where this module fuses `act` into its kernel (a
    /// convolution fuses relu); `None` where it does not, and [`Sequential`] runs the two.
    #[doc(hidden)]
    fn forward_then(&self, x: &Tensor, act: crate::UnaryOp) -> Option<Result<Tensor>> {
        let _ = (x, act);
        None
    }

    /// The options of the max pooling this module is, if it is one.
    #[doc(hidden)]
    fn max_pool(&self) -> Option<crate::Pool2dOptions> {
        None
    }

    /// `max_pool2d(relu(self.forward(x)), pool)` with no relu pass forward or backward, where
    /// this module fuses them (a convolution); `None` where it does not.
    #[doc(hidden)]
    fn forward_relu_max_pool(
        &self,
        x: &Tensor,
        pool: &crate::Pool2dOptions,
    ) -> Option<Result<Tensor>> {
        let _ = (x, pool);
        None
    }

    /// Calls `f` with the name (relative to this module), tensor and role of every parameter
    /// and buffer, in a stable order.
    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        let _ = f;
    }

    /// Switches training-only behaviour (dropout, batch statistics) on or off.
    fn set_training(&mut self, training: bool) {
        let _ = training;
    }

    /// A short description, such as `Linear(784 -> 128)`.
    fn describe(&self) -> String;

    /// Named parameters, as `torch.nn.Module.named_parameters`.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit(&mut |n, t, r| {
            if r == TensorRole::Parameter {
                out.push((n.to_string(), t.clone()));
            }
        });
        out
    }

    /// The number of parameter elements (as `sum(p.numel() for p in m.parameters())`).
    fn parameter_count(&self) -> usize {
        self.parameters().iter().map(Tensor::numel).sum()
    }

    /// The parameters, for an optimizer.
    fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    /// Parameters and buffers by name, as `torch.nn.Module.state_dict`.
    fn state_dict(&self) -> Vec<(String, Tensor, TensorRole)> {
        let mut out = Vec::new();
        self.visit(&mut |n, t, r| out.push((n.to_string(), t.clone(), r)));
        out
    }

    /// Clears every parameter's gradient.
    fn zero_grad(&self) {
        for p in self.parameters() {
            p.zero_grad();
        }
    }
}

/// Seeds for initialisation: every layer created with the same `Init` sequence gets the same
/// values on every run and device.
pub struct Init {
    device: Device,
    seed: u64,
    drawn: u64,
}

impl Init {
    /// Initialisation on `device` from `seed`.
    pub fn new(device: &Device, seed: u64) -> Init {
        Init {
            device: device.clone(),
            seed,
            drawn: 0,
        }
    }

    /// The device layers are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The next seed of the sequence.
    pub fn next_seed(&mut self) -> u64 {
        self.drawn += 1;
        // SplitMix64 of (seed, count): independent streams per tensor.
        let mut z = self
            .seed
            .wrapping_add(self.drawn.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`, as a parameter.
    pub fn uniform(&mut self, shape: &[usize], bound: f32) -> Result<Tensor> {
        let seed = self.next_seed();
        Ok(Tensor::uniform(shape, -bound, bound, seed, &self.device)?.requires_grad())
    }
}

/// Modules applied one after the other; children are named `0`, `1`, ... or by
/// [`Sequential::add_named`].
#[derive(Default)]
pub struct Sequential {
    children: Vec<(String, Box<dyn Module>)>,
}

impl Sequential {
    /// An empty sequence.
    pub fn new() -> Sequential {
        Sequential::default()
    }

    /// Appends a module named by its position.
    #[allow(clippy::should_implement_trait)]
    pub fn add(mut self, m: impl Module + 'static) -> Sequential {
        let name = self.children.len().to_string();
        self.children.push((name, Box::new(m)));
        self
    }

    /// Appends a module under `name` (its parameters are named `name.<param>`).
    pub fn add_named(mut self, name: &str, m: impl Module + 'static) -> Sequential {
        self.children.push((name.to_string(), Box::new(m)));
        self
    }

    /// The children with their names.
    pub fn children(&self) -> impl Iterator<Item = (&str, &dyn Module)> {
        self.children.iter().map(|(n, m)| (n.as_str(), m.as_ref()))
    }

    /// Number of children.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// True without children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// The network described by `spec` (see [`crate::spec`]), freshly initialised.
    ///
    /// ```
    /// use kiln::nn::{Init, Module, Sequential};
    /// # let dev = kiln::Device::default_device()?;
    /// let net = Sequential::from_spec(&mut Init::new(&dev, 0), "linear(4,8) relu dropout(0.1) linear(8,2)")?;
    /// assert_eq!(net.parameters().len(), 4);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn from_spec(init: &mut Init, spec: &str) -> Result<Sequential> {
        use crate::spec::LayerSpec as L;
        let mut seq = Sequential::new();
        for layer in crate::spec::parse(spec)? {
            let conv = layer.conv2d_options();
            let transposed = layer.conv_transpose2d_options();
            let pool = layer.pool_options();
            seq = match layer {
                L::Linear {
                    in_features,
                    out_features,
                    bias,
                } => seq.add(Linear::new(init, in_features, out_features, bias)?),
                L::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    bias,
                    ..
                } => seq.add(Conv2d::new(
                    init,
                    in_channels,
                    out_channels,
                    [kernel; 2],
                    conv.unwrap_or_default(),
                    bias,
                )?),
                L::ConvTranspose2d {
                    in_channels,
                    out_channels,
                    kernel,
                    bias,
                    ..
                } => seq.add(ConvTranspose2d::new(
                    init,
                    in_channels,
                    out_channels,
                    [kernel; 2],
                    transposed.unwrap_or_default(),
                    bias,
                )?),
                L::BatchNorm {
                    channels,
                    two_d,
                    eps,
                    momentum,
                } => {
                    let mut bn = if two_d {
                        BatchNorm::new_2d(init, channels)?
                    } else {
                        BatchNorm::new_1d(init, channels)?
                    };
                    bn.eps = eps;
                    bn.momentum = momentum;
                    seq.add(bn)
                }
                L::LayerNorm { shape, eps } => {
                    let mut ln = LayerNorm::new(init, &shape)?;
                    ln.eps = eps;
                    seq.add(ln)
                }
                L::Pool { max, kernel, .. } => {
                    let o = pool.unwrap_or_else(|| crate::Pool2dOptions::new([kernel; 2]));
                    if max {
                        seq.add(MaxPool2d(o))
                    } else {
                        seq.add(AvgPool2d(o))
                    }
                }
                L::AdaptiveAvgPool { size } => seq.add(AdaptiveAvgPool2d(size)),
                L::Flatten { start, end } => seq.add(Flatten { start, end }),
                L::Dropout { p } => seq.add(Dropout::new(init, p)?),
                L::Embedding { count, dim } => seq.add(Embedding::new(init, count, dim)?),
                L::BasicBlock {
                    in_channels,
                    out_channels,
                    stride,
                    mid,
                } => seq.add(Residual::basic_block_with_width(
                    init,
                    in_channels,
                    out_channels,
                    stride,
                    mid,
                )?),
                L::Activation { op, slope } => match op {
                    crate::UnaryOp::Gelu => seq.add(Gelu),
                    crate::UnaryOp::Tanh => seq.add(Tanh),
                    crate::UnaryOp::Sigmoid => seq.add(Sigmoid),
                    crate::UnaryOp::Silu => seq.add(Silu),
                    crate::UnaryOp::LeakyRelu => seq.add(LeakyRelu(slope)),
                    _ => seq.add(Relu),
                },
            };
        }
        Ok(seq)
    }
}

impl Module for Sequential {
    /// Each child in turn; a child followed by layers that it fuses runs them as one: a
    /// convolution followed by relu and max pooling, or by an activation
    /// ([`Module::forward_relu_max_pool`], [`Module::forward_then`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let mut i = 0;
        let child = |j: usize| self.children.get(j).map(|(_, m)| m.as_ref());
        while let Some(m) = child(i) {
            let act = child(i + 1).and_then(|a| a.activation());
            let pool = child(i + 2).and_then(|p| p.max_pool());
            let relu = act == Some(crate::UnaryOp::Relu);
            if let Some(y) = pool
                .filter(|_| relu)
                .and_then(|pool| m.forward_relu_max_pool(&h, &pool))
            {
                h = y?;
                i += 3;
            } else if let Some(y) = act.and_then(|act| m.forward_then(&h, act)) {
                h = y?;
                i += 2;
            } else {
                h = m.forward(&h)?;
                i += 1;
            }
        }
        Ok(h)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        for (name, m) in &self.children {
            m.visit(&mut |n, t, r| f(&format!("{name}.{n}"), t, r));
        }
    }

    fn set_training(&mut self, training: bool) {
        for (_, m) in &mut self.children {
            m.set_training(training);
        }
    }

    fn describe(&self) -> String {
        let inner: Vec<String> = self
            .children
            .iter()
            .map(|(n, m)| match m.parameter_count() {
                0 => format!("  ({n}): {}", m.describe()),
                c => format!("  ({n}): {}  # {c} parameters", m.describe()),
            })
            .collect();
        format!(
            "Sequential(\n{}\n)  # {} parameters",
            inner.join("\n"),
            self.parameter_count()
        )
    }
}
