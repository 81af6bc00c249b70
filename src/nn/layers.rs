//! The built-in layers.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Init, Module, TensorRole};
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::ops::conv::{Conv2dOptions, ConvTranspose2dOptions};
use crate::ops::pool::Pool2dOptions;
use crate::tensor::Tensor;

fn visit_opt(
    f: &mut dyn FnMut(&str, &Tensor, TensorRole),
    name: &str,
    t: &Option<Tensor>,
    role: TensorRole,
) {
    if let Some(t) = t {
        f(name, t, role);
    }
}

/// `y = x W^T + b` over the last axis, as `torch.nn.Linear` (weight and bias initialised
/// uniformly in ±1/sqrt(in_features)).
pub struct Linear {
    /// (out_features, in_features)
    pub weight: Tensor,
    /// (out_features)
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A layer from `in_features` to `out_features`.
    pub fn new(
        init: &mut Init,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        let bound = 1.0 / (in_features.max(1) as f32).sqrt();
        Ok(Linear {
            weight: init.uniform(&[out_features, in_features], bound)?,
            bias: if bias {
                Some(init.uniform(&[out_features], bound)?)
            } else {
                None
            },
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_features = self.weight.dims()[1];
        if x.rank() == 0 || x.dims()[x.rank() - 1] != in_features {
            return Err(Error::shape(
                "Linear",
                format!("input {:?} must end in {in_features} features", x.dims()),
            ));
        }
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        f("weight", &self.weight, TensorRole::Parameter);
        visit_opt(f, "bias", &self.bias, TensorRole::Parameter);
    }

    fn describe(&self) -> String {
        format!(
            "Linear({} -> {})",
            self.weight.dims()[1],
            self.weight.dims()[0]
        )
    }
}

/// 2-D convolution, as `torch.nn.Conv2d` (kaiming-uniform weights: ±1/sqrt(fan_in)).
pub struct Conv2d {
    /// (out_channels, in_channels / groups, kh, kw)
    pub weight: Tensor,
    /// (out_channels)
    pub bias: Option<Tensor>,
    /// Stride, padding, dilation, groups.
    pub options: Conv2dOptions,
}

impl Conv2d {
    /// A convolution from `in_channels` to `out_channels` with a `kernel` window.
    pub fn new(
        init: &mut Init,
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        options: Conv2dOptions,
        bias: bool,
    ) -> Result<Conv2d> {
        let groups = options.groups.max(1);
        if !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
            return Err(Error::invalid(
                "Conv2d",
                format!("{in_channels} input and {out_channels} output channels are not divisible by {groups} groups"),
            ));
        }
        let fan_in = in_channels / groups * kernel[0] * kernel[1];
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        Ok(Conv2d {
            weight: init.uniform(
                &[out_channels, in_channels / groups, kernel[0], kernel[1]],
                bound,
            )?,
            bias: if bias {
                Some(init.uniform(&[out_channels], bound)?)
            } else {
                None
            },
            options,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.bias.as_ref(), &self.options)
    }

    fn forward_then(&self, x: &Tensor, act: crate::UnaryOp) -> Option<Result<Tensor>> {
        (act == crate::UnaryOp::Relu)
            .then(|| x.conv2d_then(&self.weight, self.bias.as_ref(), &self.options, true, true))
    }

    fn forward_relu_max_pool(&self, x: &Tensor, pool: &Pool2dOptions) -> Option<Result<Tensor>> {
        Some(x.conv2d_relu_max_pool2d(&self.weight, self.bias.as_ref(), &self.options, pool))
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        f("weight", &self.weight, TensorRole::Parameter);
        visit_opt(f, "bias", &self.bias, TensorRole::Parameter);
    }

    fn describe(&self) -> String {
        let d = self.weight.dims();
        format!(
            "Conv2d({} -> {}, kernel {:?}, {:?})",
            d[1] * self.options.groups,
            d[0],
            [d[2], d[3]],
            self.options
        )
    }
}

/// Transposed 2-D convolution, as `torch.nn.ConvTranspose2d`.
pub struct ConvTranspose2d {
    /// (in_channels, out_channels / groups, kh, kw)
    pub weight: Tensor,
    /// (out_channels)
    pub bias: Option<Tensor>,
    /// Stride, padding, output padding, dilation, groups.
    pub options: ConvTranspose2dOptions,
}

impl ConvTranspose2d {
    /// A transposed convolution from `in_channels` to `out_channels`.
    pub fn new(
        init: &mut Init,
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        options: ConvTranspose2dOptions,
        bias: bool,
    ) -> Result<ConvTranspose2d> {
        let groups = options.groups.max(1);
        if !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
            return Err(Error::invalid(
                "ConvTranspose2d",
                format!("{in_channels} input and {out_channels} output channels are not divisible by {groups} groups"),
            ));
        }
        // PyTorch computes fan_in from weight.size(1) * kh * kw for transposed convolutions.
        let fan_in = out_channels / groups * kernel[0] * kernel[1];
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        Ok(ConvTranspose2d {
            weight: init.uniform(
                &[in_channels, out_channels / groups, kernel[0], kernel[1]],
                bound,
            )?,
            bias: if bias {
                Some(init.uniform(&[out_channels], bound)?)
            } else {
                None
            },
            options,
        })
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv_transpose2d(&self.weight, self.bias.as_ref(), &self.options)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        f("weight", &self.weight, TensorRole::Parameter);
        visit_opt(f, "bias", &self.bias, TensorRole::Parameter);
    }

    fn describe(&self) -> String {
        let d = self.weight.dims();
        format!(
            "ConvTranspose2d({} -> {}, kernel {:?})",
            d[0],
            d[1] * self.options.groups,
            [d[2], d[3]]
        )
    }
}

/// Batch normalisation over axis 1, as `torch.nn.BatchNorm1d`/`BatchNorm2d` (weight 1, bias 0,
/// running mean 0 and variance 1, momentum 0.1, eps 1e-5).
pub struct BatchNorm {
    /// (C)
    pub weight: Option<Tensor>,
    /// (C)
    pub bias: Option<Tensor>,
    /// (C), updated in training.
    pub running_mean: Tensor,
    /// (C), updated in training.
    pub running_var: Tensor,
    /// Training steps seen (a rank-0 tensor; PyTorch's `num_batches_tracked`).
    pub num_batches_tracked: Tensor,
    /// Weight of the newest batch in the running statistics.
    pub momentum: f32,
    /// Added to the variance.
    pub eps: f32,
    rank: Option<usize>,
    training: bool,
}

impl BatchNorm {
    /// Batch norm over `channels` for any input of rank >= 2.
    pub fn new(init: &mut Init, channels: usize) -> Result<BatchNorm> {
        let d = init.device().clone();
        Ok(BatchNorm {
            weight: Some(Tensor::ones(&[channels], &d)?.requires_grad()),
            bias: Some(Tensor::zeros(&[channels], &d)?.requires_grad()),
            running_mean: Tensor::zeros(&[channels], &d)?,
            running_var: Tensor::ones(&[channels], &d)?,
            num_batches_tracked: Tensor::zeros(&[], &d)?,
            momentum: 0.1,
            eps: 1e-5,
            rank: None,
            training: true,
        })
    }

    /// `torch.nn.BatchNorm2d`: inputs must be (N, C, H, W).
    pub fn new_2d(init: &mut Init, channels: usize) -> Result<BatchNorm> {
        Ok(BatchNorm {
            rank: Some(4),
            ..BatchNorm::new(init, channels)?
        })
    }

    /// `torch.nn.BatchNorm1d`: inputs must be (N, C) or (N, C, L).
    pub fn new_1d(init: &mut Init, channels: usize) -> Result<BatchNorm> {
        BatchNorm::new(init, channels)
    }

    /// True in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }
}

impl Module for BatchNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(r) = self.rank {
            if x.rank() != r {
                return Err(Error::shape(
                    "BatchNorm2d",
                    format!("input must be (N, C, H, W), got {:?}", x.dims()),
                ));
            }
        }
        let y = x.batch_norm(
            Some(&self.running_mean),
            Some(&self.running_var),
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.training,
            self.momentum,
            self.eps,
        )?;
        if self.training {
            no_grad(|| {
                self.num_batches_tracked
                    .assign(&self.num_batches_tracked.add_scalar(1.0)?)
            })?;
        }
        Ok(y)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_opt(f, "weight", &self.weight, TensorRole::Parameter);
        visit_opt(f, "bias", &self.bias, TensorRole::Parameter);
        f("running_mean", &self.running_mean, TensorRole::Buffer);
        f("running_var", &self.running_var, TensorRole::Buffer);
        f(
            "num_batches_tracked",
            &self.num_batches_tracked,
            TensorRole::Buffer,
        );
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn describe(&self) -> String {
        format!("BatchNorm({})", self.running_mean.dims()[0])
    }
}

/// Layer normalisation over the trailing `normalized_shape`, as `torch.nn.LayerNorm`.
pub struct LayerNorm {
    /// The normalised trailing shape.
    pub normalized_shape: Vec<usize>,
    /// Elementwise scale (ones).
    pub weight: Option<Tensor>,
    /// Elementwise shift (zeros).
    pub bias: Option<Tensor>,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// Layer norm with affine parameters.
    pub fn new(init: &mut Init, normalized_shape: &[usize]) -> Result<LayerNorm> {
        let d = init.device().clone();
        Ok(LayerNorm {
            normalized_shape: normalized_shape.to_vec(),
            weight: Some(Tensor::ones(normalized_shape, &d)?.requires_grad()),
            bias: Some(Tensor::zeros(normalized_shape, &d)?.requires_grad()),
            eps: 1e-5,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(
            &self.normalized_shape,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
        )
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_opt(f, "weight", &self.weight, TensorRole::Parameter);
        visit_opt(f, "bias", &self.bias, TensorRole::Parameter);
    }

    fn describe(&self) -> String {
        format!("LayerNorm({:?})", self.normalized_shape)
    }
}

/// Rows of a table picked by integer indices, as `torch.nn.Embedding` (weights N(0, 1)).
pub struct Embedding {
    /// (num_embeddings, embedding_dim)
    pub weight: Tensor,
}

impl Embedding {
    /// A table of `num` vectors of size `dim`.
    pub fn new(init: &mut Init, num: usize, dim: usize) -> Result<Embedding> {
        let seed = init.next_seed();
        Ok(Embedding {
            weight: Tensor::randn(&[num, dim], seed, init.device())?.requires_grad(),
        })
    }
}

impl Module for Embedding {
    /// `x` holds indices (as f32) of any shape; the result has shape `(*x.shape, dim)`.
    /// A fractional or out-of-range index makes the next readback an `Err` (the indices stay
    /// on the GPU; see [`Tensor::index_select`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape: Vec<usize> = x.shape();
        shape.push(self.weight.dims()[1]);
        self.weight
            .index_select(0, &x.reshape(&[-1])?)?
            .reshape_to(&shape)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        f("weight", &self.weight, TensorRole::Parameter);
    }

    fn describe(&self) -> String {
        format!(
            "Embedding({}, {})",
            self.weight.dims()[0],
            self.weight.dims()[1]
        )
    }
}

/// Dropout with probability `p`, a new mask each call (drawn from `seed` and a counter), the
/// identity in eval mode, as `torch.nn.Dropout`.
pub struct Dropout {
    /// Drop probability.
    pub p: f32,
    seed: u64,
    calls: AtomicU64,
    training: bool,
}

impl Dropout {
    /// Dropout with probability `p`, seeded from `init`.
    pub fn new(init: &mut Init, p: f32) -> Result<Dropout> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(
                "Dropout",
                format!("probability must be in [0, 1], got {p}"),
            ));
        }
        Ok(Dropout {
            p,
            seed: init.next_seed(),
            calls: AtomicU64::new(0),
            training: true,
        })
    }
}

impl Module for Dropout {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        x.dropout(
            self.p,
            self.seed ^ call.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            self.training,
        )
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn describe(&self) -> String {
        format!("Dropout({})", self.p)
    }
}

/// Max pooling, as `torch.nn.MaxPool2d`.
pub struct MaxPool2d(pub Pool2dOptions);

impl Module for MaxPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.max_pool2d(&self.0)
    }

    fn max_pool(&self) -> Option<Pool2dOptions> {
        Some(self.0)
    }

    fn describe(&self) -> String {
        format!(
            "MaxPool2d(kernel {:?}, stride {:?})",
            self.0.kernel, self.0.stride
        )
    }
}

/// Average pooling, as `torch.nn.AvgPool2d`.
pub struct AvgPool2d(pub Pool2dOptions);

impl Module for AvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.avg_pool2d(&self.0)
    }

    fn describe(&self) -> String {
        format!(
            "AvgPool2d(kernel {:?}, stride {:?})",
            self.0.kernel, self.0.stride
        )
    }
}

/// Adaptive average pooling to a fixed output size, as `torch.nn.AdaptiveAvgPool2d`.
pub struct AdaptiveAvgPool2d(pub [usize; 2]);

impl Module for AdaptiveAvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.adaptive_avg_pool2d(self.0)
    }

    fn describe(&self) -> String {
        format!("AdaptiveAvgPool2d({:?})", self.0)
    }
}

/// Flattens axes `start..=end` (PyTorch's default 1..=-1), as `torch.nn.Flatten`.
pub struct Flatten {
    /// First flattened axis.
    pub start: isize,
    /// Last flattened axis.
    pub end: isize,
}

impl Default for Flatten {
    fn default() -> Self {
        Flatten { start: 1, end: -1 }
    }
}

impl Module for Flatten {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.flatten(self.start, self.end)
    }

    fn describe(&self) -> String {
        format!("Flatten({}, {})", self.start, self.end)
    }
}

macro_rules! activation {
    ($($(#[$doc:meta])* $name:ident => $op:ident, $method:ident);* $(;)?) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Copy, Debug, Default)]
            pub struct $name;

            impl Module for $name {
                fn forward(&self, x: &Tensor) -> Result<Tensor> {
                    x.$method()
                }

                fn activation(&self) -> Option<crate::UnaryOp> {
                    Some(crate::UnaryOp::$op)
                }

                fn describe(&self) -> String {
                    stringify!($name).to_string()
                }
            }
        )*
    };
}

activation! {
    /// `max(x, 0)`, as `torch.nn.ReLU`.
    Relu => Relu, relu;
    /// GELU (erf form), as `torch.nn.GELU`.
    Gelu => Gelu, gelu;
    /// `tanh`, as `torch.nn.Tanh`.
    Tanh => Tanh, tanh;
    /// Logistic sigmoid, as `torch.nn.Sigmoid`.
    Sigmoid => Sigmoid, sigmoid;
    /// `x sigmoid(x)`, as `torch.nn.SiLU`.
    Silu => Silu, silu;
}

/// `x >= 0 ? x : slope x`, as `torch.nn.LeakyReLU` (default slope 0.01).
#[derive(Clone, Copy, Debug)]
pub struct LeakyRelu(pub f32);

impl Default for LeakyRelu {
    fn default() -> Self {
        LeakyRelu(0.01)
    }
}

impl Module for LeakyRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.leaky_relu(self.0)
    }

    fn describe(&self) -> String {
        format!("LeakyReLU({})", self.0)
    }
}

/// A skip connection: `body(x) + shortcut(x)` (the shortcut is the identity when absent),
/// followed by ReLU when `relu` is set. `Residual::basic_block` builds torchvision's
/// `BasicBlock` with its parameter names (`conv1`, `bn1`, `conv2`, `bn2`, `downsample.0`, ...),
/// so a torchvision ResNet's blocks line up with kiln's.
///
/// ```
/// use kiln::nn::{Init, Module, Residual};
/// # let dev = kiln::Device::default_device()?;
/// let block = Residual::basic_block(&mut Init::new(&dev, 0), 8, 16, 2)?;
/// let y = block.forward(&kiln::Tensor::randn(&[2, 8, 6, 6], 1, &dev)?)?;
/// assert_eq!(y.dims(), &[2, 16, 3, 3]);
/// assert!(block.named_parameters().iter().any(|(n, _)| n == "downsample.0.weight"));
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Residual {
    /// The residual branch; its children are named without a prefix.
    pub body: super::Sequential,
    /// The projection of the input (named `downsample`), or `None` for the identity.
    pub shortcut: Option<super::Sequential>,
    /// Applies ReLU to the sum.
    pub relu: bool,
}

impl Residual {
    /// `body(x) + shortcut(x)`, then ReLU if `relu`.
    pub fn new(
        body: super::Sequential,
        shortcut: Option<super::Sequential>,
        relu: bool,
    ) -> Residual {
        Residual {
            body,
            shortcut,
            relu,
        }
    }

    /// torchvision's `BasicBlock`: 3x3 conv (stride `stride`), batch norm, ReLU, 3x3 conv,
    /// batch norm, plus the input (through a 1x1 conv of stride `stride` and batch norm when
    /// the stride or the channel count changes), then ReLU. Convolutions have no bias.
    pub fn basic_block(
        init: &mut Init,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
    ) -> Result<Residual> {
        Self::basic_block_with_width(init, in_channels, out_channels, stride, out_channels)
    }

    /// [`Residual::basic_block`] with `mid` channels between its two convolutions (fewer
    /// after [`crate::prune::channels`]); the residual's channels stay `out_channels`.
    pub fn basic_block_with_width(
        init: &mut Init,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        mid: usize,
    ) -> Result<Residual> {
        if stride == 0 || mid == 0 {
            return Err(Error::invalid(
                "Residual::basic_block",
                format!("stride {stride} and width {mid} must be positive"),
            ));
        }
        let conv = |init: &mut Init, cin, cout, k, stride, pad| {
            let opts = Conv2dOptions {
                stride: [stride; 2],
                padding: [pad; 2],
                ..Default::default()
            };
            Conv2d::new(init, cin, cout, [k; 2], opts, false)
        };
        let body = super::Sequential::new()
            .add_named("conv1", conv(init, in_channels, mid, 3, stride, 1)?)
            .add_named("bn1", BatchNorm::new_2d(init, mid)?)
            .add_named("relu", Relu)
            .add_named("conv2", conv(init, mid, out_channels, 3, 1, 1)?)
            .add_named("bn2", BatchNorm::new_2d(init, out_channels)?);
        let shortcut = if stride != 1 || in_channels != out_channels {
            Some(
                super::Sequential::new()
                    .add(conv(init, in_channels, out_channels, 1, stride, 0)?)
                    .add(BatchNorm::new_2d(init, out_channels)?),
            )
        } else {
            None
        };
        Ok(Residual::new(body, shortcut, true))
    }
}

impl Module for Residual {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        let y = self.body.forward(x)?.add(&skip)?;
        if self.relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        self.body.visit(f);
        if let Some(s) = &self.shortcut {
            s.visit(&mut |n, t, r| f(&format!("downsample.{n}"), t, r));
        }
    }

    fn set_training(&mut self, training: bool) {
        self.body.set_training(training);
        if let Some(s) = &mut self.shortcut {
            s.set_training(training);
        }
    }

    fn describe(&self) -> String {
        let shortcut = self
            .shortcut
            .as_ref()
            .map_or("identity".to_string(), |s| s.describe());
        format!(
            "Residual(\n  body: {},\n  shortcut: {},\n  relu: {}\n)",
            self.body.describe(),
            shortcut,
            self.relu
        )
    }
}
