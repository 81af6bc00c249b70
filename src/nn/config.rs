//! Typed layer configurations with PyTorch's defaults, set by name instead of by position:
//! `Conv2dConfig::new(1, 16, 3).padding(1).bias(false).init(&mut init)`. Each `init` checks
//! the configuration and builds the layer with PyTorch's initialisation.

use super::blocks::{Activation, Conv1d, Gru, Lstm, MultiheadAttention, TransformerEncoderLayer};
use super::layers::{Conv2d, Embedding, LayerNorm, Linear};
use super::Init;
use crate::error::Result;
use crate::ops::conv::Conv2dOptions;

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $name: $ty) -> Self {
                self.$name = $name;
                self
            }
        )*
    };
}

/// [`Linear`]: `in_features -> out_features`, with a bias by default.
///
/// ```
/// use kiln::nn::{Init, LinearConfig};
/// # let dev = kiln::Device::default_device()?;
/// let l = LinearConfig::new(4, 3).bias(false).init(&mut Init::new(&dev, 0))?;
/// assert!(l.bias.is_none());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearConfig {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether to add a bias (true).
    pub bias: bool,
}

impl LinearConfig {
    /// PyTorch's defaults.
    pub fn new(in_features: usize, out_features: usize) -> Self {
        LinearConfig {
            in_features,
            out_features,
            bias: true,
        }
    }

    setters! {
        /// Whether to add a bias.
        bias: bool,
    }

    /// The layer.
    pub fn init(self, init: &mut Init) -> Result<Linear> {
        Linear::new(init, self.in_features, self.out_features, self.bias)
    }
}

/// [`Conv2d`]: a square `kernel` by default, stride 1, no padding, dilation 1, one group,
/// a bias.
///
/// ```
/// use kiln::nn::{Conv2dConfig, Init};
/// # let dev = kiln::Device::default_device()?;
/// let c = Conv2dConfig::new(1, 16, 3).padding(1).bias(false).init(&mut Init::new(&dev, 0))?;
/// assert_eq!(c.weight.dims(), &[16, 1, 3, 3]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Window (height, width).
    pub kernel: [usize; 2],
    /// Step (both axes).
    pub stride: usize,
    /// Zeros on each side (both axes).
    pub padding: usize,
    /// Spacing of the taps (both axes).
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
    /// Whether to add a bias.
    pub bias: bool,
}

impl Conv2dConfig {
    /// PyTorch's defaults with a `kernel` x `kernel` window.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        Conv2dConfig {
            in_channels,
            out_channels,
            kernel: [kernel; 2],
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: true,
        }
    }

    setters! {
        /// A non-square window (height, width).
        kernel: [usize; 2],
        /// The stride.
        stride: usize,
        /// The padding.
        padding: usize,
        /// The dilation.
        dilation: usize,
        /// The channel groups.
        groups: usize,
        /// Whether to add a bias.
        bias: bool,
    }

    /// The layer.
    pub fn init(self, init: &mut Init) -> Result<Conv2d> {
        let options = Conv2dOptions {
            stride: [self.stride; 2],
            padding: [self.padding; 2],
            dilation: [self.dilation; 2],
            groups: self.groups,
        };
        Conv2d::new(
            init,
            self.in_channels,
            self.out_channels,
            self.kernel,
            options,
            self.bias,
        )
    }
}

/// [`Conv1d`]: stride 1, no padding, dilation 1, one group, a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv1dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Window length.
    pub kernel: usize,
    /// Step.
    pub stride: usize,
    /// Zeros at each end.
    pub padding: usize,
    /// Spacing of the taps.
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
    /// Whether to add a bias.
    pub bias: bool,
}

impl Conv1dConfig {
    /// PyTorch's defaults.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        Conv1dConfig {
            in_channels,
            out_channels,
            kernel,
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: true,
        }
    }

    setters! {
        /// The stride.
        stride: usize,
        /// The padding.
        padding: usize,
        /// The dilation.
        dilation: usize,
        /// The channel groups.
        groups: usize,
        /// Whether to add a bias.
        bias: bool,
    }

    /// The layer.
    pub fn init(self, init: &mut Init) -> Result<Conv1d> {
        let mut c = Conv1d::grouped(
            init,
            self.in_channels,
            self.out_channels,
            self.kernel,
            self.groups,
            self.bias,
        )?;
        c.stride = self.stride;
        c.padding = self.padding;
        c.dilation = self.dilation;
        Ok(c)
    }
}

/// [`Embedding`]: `num` vectors of `dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingConfig {
    /// Table size.
    pub num: usize,
    /// Vector size.
    pub dim: usize,
}

impl EmbeddingConfig {
    /// The configuration.
    pub fn new(num: usize, dim: usize) -> Self {
        EmbeddingConfig { num, dim }
    }

    /// The layer.
    pub fn init(self, init: &mut Init) -> Result<Embedding> {
        Embedding::new(init, self.num, self.dim)
    }
}

/// [`LayerNorm`] over a trailing shape, eps 1e-5.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormConfig {
    /// The normalised trailing shape.
    pub shape: Vec<usize>,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNormConfig {
    /// PyTorch's defaults.
    pub fn new(shape: &[usize]) -> Self {
        LayerNormConfig {
            shape: shape.to_vec(),
            eps: 1e-5,
        }
    }

    setters! {
        /// The epsilon.
        eps: f32,
    }

    /// The layer.
    pub fn init(self, init: &mut Init) -> Result<LayerNorm> {
        let mut l = LayerNorm::new(init, &self.shape)?;
        l.eps = self.eps;
        Ok(l)
    }
}

/// [`MultiheadAttention`] of `embed_dim` in `num_heads` heads, with biases and no dropout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultiheadAttentionConfig {
    /// Width.
    pub embed_dim: usize,
    /// Heads (dividing the width).
    pub num_heads: usize,
    /// Whether the projections have biases.
    pub bias: bool,
}

impl MultiheadAttentionConfig {
    /// PyTorch's defaults.
    pub fn new(embed_dim: usize, num_heads: usize) -> Self {
        MultiheadAttentionConfig {
            embed_dim,
            num_heads,
            bias: true,
        }
    }

    setters! {
        /// Whether the projections have biases.
        bias: bool,
    }

    /// The layer.
    pub fn init(self, init: &mut Init) -> Result<MultiheadAttention> {
        let mut m = MultiheadAttention::new(init, self.embed_dim, self.num_heads)?;
        if !self.bias {
            m.in_proj_bias = None;
            m.out_proj.bias = None;
        }
        Ok(m)
    }
}

/// [`TransformerEncoderLayer`]: feed-forward 2048, ReLU, post-norm, eps 1e-5, dropout 0.1
/// (PyTorch's defaults).
///
/// ```
/// use kiln::nn::{Activation, Init, TransformerEncoderLayerConfig};
/// # let dev = kiln::Device::default_device()?;
/// let layer = TransformerEncoderLayerConfig::new(32, 4)
///     .dim_feedforward(64)
///     .activation(Activation::Gelu)
///     .norm_first(true)
///     .init(&mut Init::new(&dev, 0))?;
/// assert!(layer.norm_first);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransformerEncoderLayerConfig {
    /// Width.
    pub d_model: usize,
    /// Attention heads.
    pub nhead: usize,
    /// Hidden size of the feed-forward block.
    pub dim_feedforward: usize,
    /// The feed-forward activation.
    pub activation: Activation,
    /// Layer norm before each block instead of after.
    pub norm_first: bool,
    /// The layer norms' epsilon.
    pub layer_norm_eps: f32,
    /// Dropout probability in training (0.1).
    pub dropout: f32,
}

impl TransformerEncoderLayerConfig {
    /// PyTorch's defaults.
    pub fn new(d_model: usize, nhead: usize) -> Self {
        TransformerEncoderLayerConfig {
            d_model,
            nhead,
            dim_feedforward: 2048,
            activation: Activation::Relu,
            norm_first: false,
            layer_norm_eps: 1e-5,
            dropout: 0.1,
        }
    }

    setters! {
        /// The feed-forward hidden size.
        dim_feedforward: usize,
        /// The feed-forward activation.
        activation: Activation,
        /// Pre-norm.
        norm_first: bool,
        /// The layer norms' epsilon.
        layer_norm_eps: f32,
        /// The dropout probability.
        dropout: f32,
    }

    /// The layer.
    pub fn init(self, init: &mut Init) -> Result<TransformerEncoderLayer> {
        let mut l =
            TransformerEncoderLayer::new(init, self.d_model, self.nhead, self.dim_feedforward)?;
        l.activation = self.activation;
        l.norm_first = self.norm_first;
        l.norm1.eps = self.layer_norm_eps;
        l.norm2.eps = self.layer_norm_eps;
        l.set_dropout(self.dropout)?;
        Ok(l)
    }
}

/// [`Lstm`] and [`Gru`]: one layer with biases by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RnnConfig {
    /// Input features.
    pub input_size: usize,
    /// Hidden state size.
    pub hidden_size: usize,
    /// Stacked layers.
    pub num_layers: usize,
    /// Whether the gates have biases.
    pub bias: bool,
}

impl RnnConfig {
    /// PyTorch's defaults.
    pub fn new(input_size: usize, hidden_size: usize) -> Self {
        RnnConfig {
            input_size,
            hidden_size,
            num_layers: 1,
            bias: true,
        }
    }

    setters! {
        /// Stacked layers.
        num_layers: usize,
        /// Whether the gates have biases.
        bias: bool,
    }

    /// An LSTM.
    pub fn lstm(self, init: &mut Init) -> Result<Lstm> {
        Lstm::new(
            init,
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.bias,
        )
    }

    /// A GRU.
    pub fn gru(self, init: &mut Init) -> Result<Gru> {
        Gru::new(
            init,
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.bias,
        )
    }
}
