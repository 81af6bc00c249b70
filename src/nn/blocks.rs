//! Layers for sequences and containers: `Conv1d`, `GroupNorm`, `Identity`, `ModuleList`,
//! `MultiheadAttention`, `TransformerEncoderLayer`, `Lstm` and `Gru`, with PyTorch's
//! `state_dict` names, tensor order and default initialisations.

use super::layers::{Dropout, LayerNorm, Linear};
use super::{Init, Module, TensorRole};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn visit_child(f: &mut dyn FnMut(&str, &Tensor, TensorRole), prefix: &str, child: &dyn Module) {
    child.visit(&mut |n, t, r| f(&format!("{prefix}.{n}"), t, r));
}

/// 1-D convolution over `(N, C, L)` (or `(C, L)`), as `torch.nn.Conv1d` (weights and bias
/// uniform in ±1/sqrt(fan_in), fan_in = C / groups * kernel).
///
/// ```
/// use kiln::nn::{Conv1d, Init, Module};
/// # let dev = kiln::Device::default_device()?;
/// let mut conv = Conv1d::new(&mut Init::new(&dev, 0), 4, 8, 3, true)?;
/// conv.padding = 1;
/// let y = conv.forward(&kiln::Tensor::randn(&[2, 4, 10], 1, &dev)?)?;
/// assert_eq!(y.dims(), &[2, 8, 10]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Conv1d {
    /// (out_channels, in_channels / groups, kernel)
    pub weight: Tensor,
    /// (out_channels)
    pub bias: Option<Tensor>,
    /// Step between windows.
    pub stride: usize,
    /// Zeros added at both ends.
    pub padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
}

impl Conv1d {
    /// A convolution from `in_channels` to `out_channels` with stride 1, no padding, dilation 1
    /// and one group; set the public fields for others.
    pub fn new(
        init: &mut Init,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        bias: bool,
    ) -> Result<Conv1d> {
        Conv1d::grouped(init, in_channels, out_channels, kernel, 1, bias)
    }

    /// The same with `groups` channel groups.
    pub fn grouped(
        init: &mut Init,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        groups: usize,
        bias: bool,
    ) -> Result<Conv1d> {
        if groups == 0
            || !in_channels.is_multiple_of(groups)
            || !out_channels.is_multiple_of(groups)
        {
            return Err(Error::invalid(
                "Conv1d",
                format!("{in_channels} input and {out_channels} output channels are not divisible by {groups} groups"),
            ));
        }
        let fan_in = in_channels / groups * kernel;
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        Ok(Conv1d {
            weight: init.uniform(&[out_channels, in_channels / groups, kernel], bound)?,
            bias: if bias {
                Some(init.uniform(&[out_channels], bound)?)
            } else {
                None
            },
            stride: 1,
            padding: 0,
            dilation: 1,
            groups,
        })
    }
}

impl Module for Conv1d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 2 {
            return self.forward(&x.unsqueeze(0)?)?.squeeze(Some(0));
        }
        x.conv1d(
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        f("weight", &self.weight, TensorRole::Parameter);
        if let Some(b) = &self.bias {
            f("bias", b, TensorRole::Parameter);
        }
    }

    fn describe(&self) -> String {
        let d = self.weight.dims();
        format!(
            "Conv1d({} -> {}, kernel {})",
            d[1] * self.groups,
            d[0],
            d[2]
        )
    }
}

/// Group normalisation over axis 1, as `torch.nn.GroupNorm` (weight 1, bias 0, eps 1e-5).
///
/// ```
/// use kiln::nn::{GroupNorm, Init, Module};
/// # let dev = kiln::Device::default_device()?;
/// let gn = GroupNorm::new(&mut Init::new(&dev, 0), 2, 6)?;
/// let y = gn.forward(&kiln::Tensor::randn(&[3, 6, 5], 1, &dev)?)?;
/// assert_eq!(y.dims(), &[3, 6, 5]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct GroupNorm {
    /// Channel groups.
    pub groups: usize,
    /// (C), or `None` without affine parameters.
    pub weight: Option<Tensor>,
    /// (C)
    pub bias: Option<Tensor>,
    /// Added to the variance.
    pub eps: f32,
}

impl GroupNorm {
    /// `groups` groups over `channels` channels, with affine parameters.
    pub fn new(init: &mut Init, groups: usize, channels: usize) -> Result<GroupNorm> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::invalid(
                "GroupNorm",
                format!("{channels} channels are not divisible by {groups} groups"),
            ));
        }
        let d = init.device().clone();
        Ok(GroupNorm {
            groups,
            weight: Some(Tensor::ones(&[channels], &d)?.requires_grad()),
            bias: Some(Tensor::zeros(&[channels], &d)?.requires_grad()),
            eps: 1e-5,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.group_norm(
            self.groups,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
        )
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        if let Some(w) = &self.weight {
            f("weight", w, TensorRole::Parameter);
        }
        if let Some(b) = &self.bias {
            f("bias", b, TensorRole::Parameter);
        }
    }

    fn describe(&self) -> String {
        format!("GroupNorm({} groups)", self.groups)
    }
}

/// The input itself, as `torch.nn.Identity`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Identity;

impl Module for Identity {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn describe(&self) -> String {
        "Identity".to_string()
    }
}

/// Modules held in a list and named `0`, `1`, ..., as `torch.nn.ModuleList`: it registers
/// their tensors and switches their mode; the caller decides how to run them, so `forward` is
/// an error.
///
/// ```
/// use kiln::nn::{Init, Linear, Module, ModuleList};
/// # let dev = kiln::Device::default_device()?;
/// let mut init = Init::new(&dev, 0);
/// let mut heads = ModuleList::new();
/// heads.push(Linear::new(&mut init, 4, 2, true)?);
/// heads.push(Linear::new(&mut init, 4, 3, true)?);
/// assert_eq!(heads.named_parameters()[2].0, "1.weight");
/// let x = kiln::Tensor::ones(&[1, 4], &dev)?;
/// let outs: Vec<_> = heads.iter().map(|h| h.forward(&x)).collect::<kiln::Result<_>>()?;
/// assert_eq!(outs[1].dims(), &[1, 3]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Default)]
pub struct ModuleList {
    /// The modules, in order.
    pub modules: Vec<Box<dyn Module>>,
}

impl ModuleList {
    /// An empty list.
    pub fn new() -> ModuleList {
        ModuleList::default()
    }

    /// The list with `m` appended.
    pub fn push(&mut self, m: impl Module + 'static) {
        self.modules.push(Box::new(m));
    }

    /// The modules, in order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Module> {
        self.modules.iter().map(|m| m.as_ref())
    }

    /// The number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

impl Module for ModuleList {
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(
            "ModuleList",
            "a ModuleList has no forward: iterate over its modules",
        ))
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        for (i, m) in self.modules.iter().enumerate() {
            visit_child(f, &i.to_string(), m.as_ref());
        }
    }

    fn set_training(&mut self, training: bool) {
        for m in &mut self.modules {
            m.set_training(training);
        }
    }

    fn describe(&self) -> String {
        let inner: Vec<String> = self
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| format!("  ({i}): {}", m.describe()))
            .collect();
        format!("ModuleList(\n{}\n)", inner.join("\n"))
    }
}

/// An additive causal mask `(len, len)`: 0 on and below the diagonal, -inf above it, so
/// position i attends to positions 0..=i (PyTorch's
/// `nn.Transformer.generate_square_subsequent_mask`).
pub fn causal_mask(len: usize, device: &crate::Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..len * len)
        .map(|i| {
            if i % len > i / len {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_slice(&v, &[len, len], device)
}

/// Multi-head scaled dot-product attention, as `torch.nn.MultiheadAttention` with
/// `batch_first=True` and no dropout: inputs `(N, L, E)` (or `(L, E)`). Parameters
/// `in_proj_weight` (3E, E, xavier-uniform), `in_proj_bias` (zeros), `out_proj.weight`
/// (±1/sqrt(E)) and `out_proj.bias` (zeros).
///
/// ```
/// use kiln::nn::{causal_mask, Init, Module, MultiheadAttention};
/// # let dev = kiln::Device::default_device()?;
/// let mha = MultiheadAttention::new(&mut Init::new(&dev, 0), 8, 2)?;
/// let x = kiln::Tensor::randn(&[3, 5, 8], 1, &dev)?;
/// let y = mha.attend(&x, &x, &x, Some(&causal_mask(5, &dev)?), None)?;
/// assert_eq!(y.dims(), &[3, 5, 8]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct MultiheadAttention {
    /// (3 E, E): the query, key and value projections stacked.
    pub in_proj_weight: Tensor,
    /// (3 E)
    pub in_proj_bias: Option<Tensor>,
    /// The output projection (E -> E).
    pub out_proj: Linear,
    /// Number of heads (divides E).
    pub num_heads: usize,
    /// Dropout on the attention weights in training (probability 0 by default, as PyTorch's).
    pub dropout: Dropout,
}

impl MultiheadAttention {
    /// Attention over `embed_dim` features in `num_heads` heads, with biases.
    pub fn new(init: &mut Init, embed_dim: usize, num_heads: usize) -> Result<MultiheadAttention> {
        if num_heads == 0 || embed_dim == 0 || !embed_dim.is_multiple_of(num_heads) {
            return Err(Error::invalid(
                "MultiheadAttention",
                format!("embed_dim {embed_dim} is not divisible by {num_heads} heads"),
            ));
        }
        let d = init.device().clone();
        // xavier_uniform_ on (3E, E): bound sqrt(6 / (fan_in + fan_out)).
        let bound = (6.0 / (embed_dim + 3 * embed_dim) as f32).sqrt();
        let in_proj_weight = init.uniform(&[3 * embed_dim, embed_dim], bound)?;
        let mut out_proj = Linear::new(init, embed_dim, embed_dim, true)?;
        out_proj.bias = Some(Tensor::zeros(&[embed_dim], &d)?.requires_grad());
        Ok(MultiheadAttention {
            in_proj_weight,
            in_proj_bias: Some(Tensor::zeros(&[3 * embed_dim], &d)?.requires_grad()),
            out_proj,
            num_heads,
            dropout: Dropout::new(init, 0.0)?,
        })
    }

    /// Attention of `query` `(N, L, E)` over `key` and `value` `(N, S, E)` (or unbatched
    /// `(L, E)`, `(S, E)`). `attn_mask` is added to the scores: `(L, S)` or `(N * heads, L, S)`,
    /// -inf to forbid (see [`causal_mask`]). `key_padding_mask` `(N, S)` is non-zero where a
    /// key is padding. A query row with every key forbidden gives NaN, as in PyTorch.
    pub fn attend(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        attn_mask: Option<&Tensor>,
        key_padding_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        const OP: &str = "MultiheadAttention";
        if query.rank() == 2 && key.rank() == 2 && value.rank() == 2 {
            let kp = key_padding_mask.map(|m| m.unsqueeze(0)).transpose()?;
            return self
                .attend(
                    &query.unsqueeze(0)?,
                    &key.unsqueeze(0)?,
                    &value.unsqueeze(0)?,
                    attn_mask,
                    kp.as_ref(),
                )?
                .squeeze(Some(0));
        }
        let e = self.in_proj_weight.dims()[1];
        let h = self.num_heads;
        let hd = e / h;
        let (n, l, s) = match (query.dims(), key.dims(), value.dims()) {
            ([n, l, qe], [kn, s, ke], [vn, vs, ve])
                if *qe == e && *ke == e && *ve == e && n == kn && n == vn && s == vs =>
            {
                (*n, *l, *s)
            }
            _ => {
                return Err(Error::shape(
                    OP,
                    format!(
                        "query {:?}, key {:?} and value {:?} must be (N, L, {e}), (N, S, {e}), (N, S, {e})",
                        query.dims(),
                        key.dims(),
                        value.dims()
                    ),
                ))
            }
        };
        let proj = |x: &Tensor, k: usize| -> Result<Tensor> {
            let w = self.in_proj_weight.narrow(0, k * e, e)?;
            let y = x.matmul(&w.t()?)?;
            let y = match &self.in_proj_bias {
                Some(b) => y.add(&b.narrow(0, k * e, e)?)?,
                None => y,
            };
            // (N, T, E) -> (N, H, T, D)
            let t = y.dims()[1];
            y.reshape_to(&[n, t, h, hd])?.permute(&[0, 2, 1, 3])
        };
        let (q, k, v) = (proj(query, 0)?, proj(key, 1)?, proj(value, 2)?);
        let mut scores = q
            .matmul(&k.permute(&[0, 1, 3, 2])?)?
            .mul_scalar(1.0 / (hd as f32).sqrt())?;
        if let Some(m) = attn_mask {
            let m = match m.dims() {
                [ml, ms] if *ml == l && *ms == s => m.clone(),
                [b, ml, ms] if *b == n * h && *ml == l && *ms == s => {
                    m.reshape_to(&[n, h, l, s])?
                }
                other => {
                    return Err(Error::shape(
                        OP,
                        format!(
                            "attn_mask {other:?} must be ({l}, {s}) or ({}, {l}, {s})",
                            n * h
                        ),
                    ))
                }
            };
            scores = scores.add(&m)?;
        }
        if let Some(p) = key_padding_mask {
            if p.dims() != [n, s] {
                return Err(Error::shape(
                    OP,
                    format!("key_padding_mask {:?} must be ({n}, {s})", p.dims()),
                ));
            }
            let p = p.reshape_to(&[n, 1, 1, s])?.expand(&[n, h, l, s])?;
            scores = scores.masked_fill(&p, f32::NEG_INFINITY)?;
        }
        let out = self
            .dropout
            .forward(&scores.softmax(-1)?)?
            .matmul(&v)?
            .permute(&[0, 2, 1, 3])?
            .contiguous()?
            .reshape_to(&[n, l, e])?;
        self.out_proj.forward(&out)
    }
}

impl Module for MultiheadAttention {
    /// Self-attention without a mask.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.attend(x, x, x, None, None)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        f(
            "in_proj_weight",
            &self.in_proj_weight,
            TensorRole::Parameter,
        );
        if let Some(b) = &self.in_proj_bias {
            f("in_proj_bias", b, TensorRole::Parameter);
        }
        visit_child(f, "out_proj", &self.out_proj);
    }

    fn set_training(&mut self, training: bool) {
        self.dropout.set_training(training);
    }

    fn describe(&self) -> String {
        format!(
            "MultiheadAttention({}, {} heads)",
            self.in_proj_weight.dims()[1],
            self.num_heads
        )
    }
}

/// The feed-forward activation of a [`TransformerEncoderLayer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    /// ReLU (PyTorch's default).
    #[default]
    Relu,
    /// GELU (erf form).
    Gelu,
}

/// A transformer encoder layer, as `torch.nn.TransformerEncoderLayer` with `batch_first=True`:
/// self-attention then a feed-forward block, each with a residual connection and layer norm,
/// after (post-norm, PyTorch's default) or before (`norm_first`), and PyTorch's dropout of 0.1
/// in training (on the attention weights, inside the feed-forward block and on each branch;
/// [`TransformerEncoderLayer::set_dropout`] or the config changes it).
///
/// ```
/// use kiln::nn::{causal_mask, Init, TransformerEncoderLayer};
/// # let dev = kiln::Device::default_device()?;
/// let layer = TransformerEncoderLayer::new(&mut Init::new(&dev, 0), 16, 4, 32)?;
/// let x = kiln::Tensor::randn(&[2, 6, 16], 1, &dev)?;
/// let y = layer.forward_masked(&x, Some(&causal_mask(6, &dev)?), None)?;
/// assert_eq!(y.dims(), &[2, 6, 16]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct TransformerEncoderLayer {
    /// `self_attn`
    pub self_attn: MultiheadAttention,
    /// `linear1`: d_model -> dim_feedforward
    pub linear1: Linear,
    /// `linear2`: dim_feedforward -> d_model
    pub linear2: Linear,
    /// `norm1`
    pub norm1: LayerNorm,
    /// `norm2`
    pub norm2: LayerNorm,
    /// The feed-forward activation.
    pub activation: Activation,
    /// Layer norm before each block instead of after.
    pub norm_first: bool,
    /// `dropout` (inside the feed-forward block), `dropout1` (attention branch), `dropout2`
    /// (feed-forward branch), as PyTorch names them.
    pub dropouts: [Dropout; 3],
}

impl TransformerEncoderLayer {
    /// Sets every dropout probability of the layer (the attention weights' included).
    pub fn set_dropout(&mut self, p: f32) -> Result<()> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(
                "TransformerEncoderLayer",
                format!("dropout must be in [0, 1], got {p}"),
            ));
        }
        self.self_attn.dropout.p = p;
        for d in &mut self.dropouts {
            d.p = p;
        }
        Ok(())
    }

    /// A layer of width `d_model`, `nhead` heads and a feed-forward block of
    /// `dim_feedforward`, post-norm with ReLU (PyTorch's defaults; set the public fields for
    /// others).
    pub fn new(
        init: &mut Init,
        d_model: usize,
        nhead: usize,
        dim_feedforward: usize,
    ) -> Result<TransformerEncoderLayer> {
        let mut self_attn = MultiheadAttention::new(init, d_model, nhead)?;
        self_attn.dropout = Dropout::new(init, 0.1)?;
        Ok(TransformerEncoderLayer {
            self_attn,
            linear1: Linear::new(init, d_model, dim_feedforward, true)?,
            linear2: Linear::new(init, dim_feedforward, d_model, true)?,
            norm1: LayerNorm::new(init, &[d_model])?,
            norm2: LayerNorm::new(init, &[d_model])?,
            activation: Activation::Relu,
            norm_first: false,
            dropouts: [
                Dropout::new(init, 0.1)?,
                Dropout::new(init, 0.1)?,
                Dropout::new(init, 0.1)?,
            ],
        })
    }

    /// The layer over `x` `(N, L, E)` with an additive attention mask and a key padding mask
    /// (see [`MultiheadAttention::attend`]).
    pub fn forward_masked(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        key_padding_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let [inner, after_attn, after_ff] = &self.dropouts;
        let attend = |x: &Tensor| {
            after_attn.forward(&self.self_attn.attend(x, x, x, mask, key_padding_mask)?)
        };
        let ff = |x: &Tensor| -> Result<Tensor> {
            let h = self.linear1.forward(x)?;
            let h = match self.activation {
                Activation::Relu => h.relu()?,
                Activation::Gelu => h.gelu()?,
            };
            after_ff.forward(&self.linear2.forward(&inner.forward(&h)?)?)
        };
        if self.norm_first {
            let x = x.add(&attend(&self.norm1.forward(x)?)?)?;
            x.add(&ff(&self.norm2.forward(&x)?)?)
        } else {
            let x = self.norm1.forward(&x.add(&attend(x)?)?)?;
            self.norm2.forward(&x.add(&ff(&x)?)?)
        }
    }
}

impl Module for TransformerEncoderLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_masked(x, None, None)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_child(f, "self_attn", &self.self_attn);
        visit_child(f, "linear1", &self.linear1);
        visit_child(f, "linear2", &self.linear2);
        visit_child(f, "norm1", &self.norm1);
        visit_child(f, "norm2", &self.norm2);
    }

    fn set_training(&mut self, training: bool) {
        self.self_attn.set_training(training);
        for d in &mut self.dropouts {
            d.set_training(training);
        }
    }

    fn describe(&self) -> String {
        format!(
            "TransformerEncoderLayer({}, ff {}, {:?}{})",
            self.linear1.weight.dims()[1],
            self.linear1.weight.dims()[0],
            self.activation,
            if self.norm_first { ", norm first" } else { "" }
        )
    }
}

/// One layer's weights of a recurrent network (PyTorch's `weight_ih_l{k}` and so on).
struct RnnLayer {
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Option<Tensor>,
    bias_hh: Option<Tensor>,
}

/// The weights of a stack of recurrent layers with `gates` gates each, uniform in
/// ±1/sqrt(hidden) as PyTorch initialises them.
fn rnn_layers(
    op: &'static str,
    init: &mut Init,
    gates: usize,
    input_size: usize,
    hidden: usize,
    num_layers: usize,
    bias: bool,
) -> Result<Vec<RnnLayer>> {
    if input_size == 0 || hidden == 0 || num_layers == 0 {
        return Err(Error::invalid(
            op,
            format!("input_size {input_size}, hidden_size {hidden} and num_layers {num_layers} must be positive"),
        ));
    }
    let bound = 1.0 / (hidden as f32).sqrt();
    (0..num_layers)
        .map(|k| {
            let inputs = if k == 0 { input_size } else { hidden };
            Ok(RnnLayer {
                weight_ih: init.uniform(&[gates * hidden, inputs], bound)?,
                weight_hh: init.uniform(&[gates * hidden, hidden], bound)?,
                bias_ih: bias
                    .then(|| init.uniform(&[gates * hidden], bound))
                    .transpose()?,
                bias_hh: bias
                    .then(|| init.uniform(&[gates * hidden], bound))
                    .transpose()?,
            })
        })
        .collect()
}

fn visit_rnn(layers: &[RnnLayer], f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
    for (k, l) in layers.iter().enumerate() {
        f(
            &format!("weight_ih_l{k}"),
            &l.weight_ih,
            TensorRole::Parameter,
        );
        f(
            &format!("weight_hh_l{k}"),
            &l.weight_hh,
            TensorRole::Parameter,
        );
        if let Some(b) = &l.bias_ih {
            f(&format!("bias_ih_l{k}"), b, TensorRole::Parameter);
        }
        if let Some(b) = &l.bias_hh {
            f(&format!("bias_hh_l{k}"), b, TensorRole::Parameter);
        }
    }
}

/// `x W^T + b` for the recurrent projections.
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.add(b),
        None => Ok(y),
    }
}

/// Checks a batch-first sequence `(N, T, input)` (or unbatched `(T, input)`); returns it
/// batched and whether it was.
fn sequence(op: &'static str, x: &Tensor, input_size: usize) -> Result<(Tensor, bool)> {
    let batched = x.rank() == 3;
    let x = if x.rank() == 2 {
        x.unsqueeze(0)?
    } else {
        x.clone()
    };
    if x.rank() != 3 || x.dims()[2] != input_size || x.dims()[1] == 0 {
        return Err(Error::shape(
            op,
            format!(
                "input {:?} must be (N, T, {input_size}) or (T, {input_size}) with T > 0",
                x.dims()
            ),
        ));
    }
    Ok((x, batched))
}

/// A recurrent state `(num_layers, N, hidden)`, given or zeros.
fn initial_state(
    op: &'static str,
    given: Option<&Tensor>,
    layers: usize,
    n: usize,
    hidden: usize,
    x: &Tensor,
) -> Result<Tensor> {
    match given {
        Some(h) if h.dims() == [layers, n, hidden] => Ok(h.clone()),
        Some(h) => Err(Error::shape(
            op,
            format!(
                "initial state {:?} must be ({layers}, {n}, {hidden})",
                h.dims()
            ),
        )),
        None => Tensor::zeros(&[layers, n, hidden], x.device()),
    }
}

/// Runs stacked recurrent layers over `x` `(N, T, input)`: for each layer, the input
/// projection of every step at once, then `cell(layer, projected step input, state)` step by
/// step from `initial(layer index)`; `hidden(state)` is the step's output, the next layer's
/// input. Returns the last layer's outputs `(N, T, hidden)` and every layer's final state.
fn run_layers<S>(
    layers: &[RnnLayer],
    x: Tensor,
    initial: impl Fn(usize) -> Result<S>,
    hidden: impl Fn(&S) -> &Tensor,
    cell: impl Fn(&RnnLayer, &Tensor, &S) -> Result<S>,
) -> Result<(Tensor, Vec<S>)> {
    let t = x.dims()[1];
    let mut input = x;
    let mut finals = Vec::with_capacity(layers.len());
    for (k, l) in layers.iter().enumerate() {
        let xi = affine(&input, &l.weight_ih, l.bias_ih.as_ref())?;
        let mut state = initial(k)?;
        let mut outs = Vec::with_capacity(t);
        for step in 0..t {
            state = cell(l, &xi.narrow(1, step, 1)?.squeeze(Some(1))?, &state)?;
            outs.push(hidden(&state).clone());
        }
        let refs: Vec<&Tensor> = outs.iter().collect();
        input = Tensor::stack(&refs, 1)?;
        finals.push(state);
    }
    Ok((input, finals))
}

/// A long short-term memory network, as `torch.nn.LSTM` with `batch_first=True`: gates in
/// PyTorch's order (input, forget, cell, output), parameters `weight_ih_l{k}`,
/// `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`. `forward` returns the last layer's
/// hidden state at every step `(N, T, hidden)`; [`Lstm::forward_with_state`] also takes and
/// returns `(h, c)`.
///
/// ```
/// use kiln::nn::{Init, Lstm};
/// # let dev = kiln::Device::default_device()?;
/// let lstm = Lstm::new(&mut Init::new(&dev, 0), 3, 8, 2, true)?;
/// let (out, (h, c)) = lstm.forward_with_state(&kiln::Tensor::randn(&[4, 5, 3], 1, &dev)?, None)?;
/// assert_eq!((out.dims(), h.dims(), c.dims()), (&[4, 5, 8][..], &[2, 4, 8][..], &[2, 4, 8][..]));
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Lstm {
    layers: Vec<RnnLayer>,
    input_size: usize,
    hidden_size: usize,
}

impl Lstm {
    /// `num_layers` stacked layers from `input_size` features to `hidden_size`.
    pub fn new(
        init: &mut Init,
        input_size: usize,
        hidden_size: usize,
        num_layers: usize,
        bias: bool,
    ) -> Result<Lstm> {
        Ok(Lstm {
            layers: rnn_layers("LSTM", init, 4, input_size, hidden_size, num_layers, bias)?,
            input_size,
            hidden_size,
        })
    }

    /// The outputs `(N, T, hidden)` and the final `(h, c)`, each `(num_layers, N, hidden)`,
    /// from the initial state (zeros when `None`). Unbatched `(T, input)` inputs drop the N
    /// axis throughout.
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        const OP: &str = "LSTM";
        let (x, batched) = sequence(OP, x, self.input_size)?;
        let (n, hd) = (x.dims()[0], self.hidden_size);
        let nl = self.layers.len();
        let unbatch = |s: Option<&Tensor>| -> Result<Option<Tensor>> {
            s.map(|s| {
                if batched {
                    Ok(s.clone())
                } else {
                    s.unsqueeze(1)
                }
            })
            .transpose()
        };
        let (h0, c0) = (unbatch(state.map(|s| s.0))?, unbatch(state.map(|s| s.1))?);
        let h0 = initial_state(OP, h0.as_ref(), nl, n, hd, &x)?;
        let c0 = initial_state(OP, c0.as_ref(), nl, n, hd, &x)?;
        let (output, states) = run_layers(
            &self.layers,
            x,
            |k| {
                Ok((
                    h0.narrow(0, k, 1)?.squeeze(Some(0))?,
                    c0.narrow(0, k, 1)?.squeeze(Some(0))?,
                ))
            },
            |s| &s.0,
            |l, xi, (h, c)| {
                let g = xi.add(&affine(h, &l.weight_hh, l.bias_hh.as_ref())?)?;
                let gate = |j: usize| g.narrow(1, j * hd, hd);
                let (i, f, gg, o) = (
                    gate(0)?.sigmoid()?,
                    gate(1)?.sigmoid()?,
                    gate(2)?.tanh()?,
                    gate(3)?.sigmoid()?,
                );
                let c = f.mul(c)?.add(&i.mul(&gg)?)?;
                Ok((o.mul(&c.tanh()?)?, c))
            },
        )?;
        let input = output;
        let (hs, cs): (Vec<Tensor>, Vec<Tensor>) = states.into_iter().unzip();
        let (hr, cr): (Vec<&Tensor>, Vec<&Tensor>) = (hs.iter().collect(), cs.iter().collect());
        let (h, c) = (Tensor::stack(&hr, 0)?, Tensor::stack(&cr, 0)?);
        if batched {
            Ok((input, (h, c)))
        } else {
            Ok((
                input.squeeze(Some(0))?,
                (h.squeeze(Some(1))?, c.squeeze(Some(1))?),
            ))
        }
    }
}

impl Module for Lstm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_state(x, None)?.0)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_rnn(&self.layers, f);
    }

    fn describe(&self) -> String {
        format!(
            "LSTM({} -> {}, {} layers)",
            self.input_size,
            self.hidden_size,
            self.layers.len()
        )
    }
}

/// A gated recurrent unit network, as `torch.nn.GRU` with `batch_first=True`: gates in
/// PyTorch's order (reset, update, new), `n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`,
/// `h' = (1 - z) * n + z * h`.
///
/// ```
/// use kiln::nn::{Gru, Init, Module};
/// # let dev = kiln::Device::default_device()?;
/// let gru = Gru::new(&mut Init::new(&dev, 0), 3, 8, 1, true)?;
/// assert_eq!(gru.forward(&kiln::Tensor::randn(&[5, 3], 1, &dev)?)?.dims(), &[5, 8]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Gru {
    layers: Vec<RnnLayer>,
    input_size: usize,
    hidden_size: usize,
}

impl Gru {
    /// `num_layers` stacked layers from `input_size` features to `hidden_size`.
    pub fn new(
        init: &mut Init,
        input_size: usize,
        hidden_size: usize,
        num_layers: usize,
        bias: bool,
    ) -> Result<Gru> {
        Ok(Gru {
            layers: rnn_layers("GRU", init, 3, input_size, hidden_size, num_layers, bias)?,
            input_size,
            hidden_size,
        })
    }

    /// The outputs `(N, T, hidden)` and the final `h` `(num_layers, N, hidden)`, from `h0`
    /// (zeros when `None`).
    pub fn forward_with_state(&self, x: &Tensor, h0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        const OP: &str = "GRU";
        let (x, batched) = sequence(OP, x, self.input_size)?;
        let (n, hd) = (x.dims()[0], self.hidden_size);
        let h0 = match h0 {
            Some(h) if !batched => Some(h.unsqueeze(1)?),
            other => other.cloned(),
        };
        let h0 = initial_state(OP, h0.as_ref(), self.layers.len(), n, hd, &x)?;
        let (input, hs) = run_layers(
            &self.layers,
            x,
            |k| h0.narrow(0, k, 1)?.squeeze(Some(0)),
            |h| h,
            |l, a, h| {
                let b = affine(h, &l.weight_hh, l.bias_hh.as_ref())?;
                let part = |m: &Tensor, j: usize| m.narrow(1, j * hd, hd);
                let r = part(a, 0)?.add(&part(&b, 0)?)?.sigmoid()?;
                let z = part(a, 1)?.add(&part(&b, 1)?)?.sigmoid()?;
                let nn = part(a, 2)?.add(&r.mul(&part(&b, 2)?)?)?.tanh()?;
                // (1 - z) n + z h = n + z (h - n)
                nn.add(&z.mul(&h.sub(&nn)?)?)
            },
        )?;
        let hr: Vec<&Tensor> = hs.iter().collect();
        let h = Tensor::stack(&hr, 0)?;
        if batched {
            Ok((input, h))
        } else {
            Ok((input.squeeze(Some(0))?, h.squeeze(Some(1))?))
        }
    }
}

impl Module for Gru {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_state(x, None)?.0)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        visit_rnn(&self.layers, f);
    }

    fn describe(&self) -> String {
        format!(
            "GRU({} -> {}, {} layers)",
            self.input_size,
            self.hidden_size,
            self.layers.len()
        )
    }
}
