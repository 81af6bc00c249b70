//! Unstructured pruning, in the spirit of `torch.nn.utils.prune`: L1 masks that zero the
//! smallest weights by magnitude, per tensor ([`l1_unstructured`]) or over several tensors at
//! once ([`global_l1_unstructured`]). The masks are applied during fine-tuning: call
//! [`Pruning::apply`] after each optimizer step (as PyTorch's reparametrisation keeps the
//! pruned entries at zero), and [`Pruning::remove`] to make the pruning permanent and drop
//! the masks. As in PyTorch, the number pruned is `round(amount * size)`.
//!
//! ```
//! use kiln::nn::{Init, Module, Sequential};
//! # let dev = kiln::Device::default_device()?;
//! let net = Sequential::from_spec(&mut Init::new(&dev, 0), "linear(8,16) relu linear(16,4)")?;
//! let pruning = kiln::prune::global_l1_unstructured(&kiln::prune::weights(&net), 0.5)?;
//! assert!((pruning.sparsity()? - 0.5).abs() < 1e-6);
//! // ... optimizer steps, each followed by pruning.apply()? ...
//! pruning.remove()?;
//! # Ok::<(), kiln::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::nn::Module;
use crate::tensor::Tensor;

/// Masks over parameters: 1 keeps an entry, 0 prunes it.
pub struct Pruning {
    entries: Vec<(String, Tensor, Tensor)>,
}

/// The weights of a module's layers that pruning usually targets: every parameter of rank 2
/// or more (linear and convolution weights; biases and normalisation scales are left alone).
pub fn weights(model: &dyn Module) -> Vec<(String, Tensor)> {
    model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.rank() >= 2)
        .collect()
}

fn check(op: &'static str, params: &[(String, Tensor)], amount: f32) -> Result<()> {
    if !(0.0..1.0).contains(&amount) {
        return Err(Error::invalid(
            op,
            format!("the amount {amount} must be in [0, 1)"),
        ));
    }
    if params.is_empty() {
        return Err(Error::invalid(op, "no parameters to prune"));
    }
    Ok(())
}

/// Masks keeping all but the `k` smallest |v| (ties broken by position, first pruned).
fn masks_for(values: &[f32], k: usize) -> Vec<f32> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b)));
    let mut mask = vec![1.0; values.len()];
    for &i in &order[..k.min(values.len())] {
        mask[i] = 0.0;
    }
    mask
}

fn build(params: &[(String, Tensor)], masks: Vec<Vec<f32>>) -> Result<Pruning> {
    let mut entries = Vec::with_capacity(params.len());
    for ((name, t), m) in params.iter().zip(masks) {
        let mask = Tensor::from_slice(&m, t.dims(), t.device())?;
        entries.push((name.clone(), t.clone(), mask));
    }
    let p = Pruning { entries };
    p.apply()?;
    Ok(p)
}

/// Prunes `round(amount * size)` entries of each tensor, the smallest by magnitude, and
/// applies the masks. `Err` for an amount outside [0, 1) or no parameters.
pub fn l1_unstructured(params: &[(String, Tensor)], amount: f32) -> Result<Pruning> {
    check("prune::l1_unstructured", params, amount)?;
    let mut masks = Vec::with_capacity(params.len());
    for (_, t) in params {
        let v = t.to_vec()?;
        let k = (amount as f64 * v.len() as f64).round() as usize;
        masks.push(masks_for(&v, k));
    }
    build(params, masks)
}

/// Prunes `round(amount * total)` entries over all the tensors together, the smallest by
/// magnitude wherever they are, and applies the masks.
pub fn global_l1_unstructured(params: &[(String, Tensor)], amount: f32) -> Result<Pruning> {
    check("prune::global_l1_unstructured", params, amount)?;
    let values: Vec<Vec<f32>> = params
        .iter()
        .map(|(_, t)| t.to_vec())
        .collect::<Result<_>>()?;
    let all: Vec<f32> = values.iter().flatten().copied().collect();
    let k = (amount as f64 * all.len() as f64).round() as usize;
    let flat = masks_for(&all, k);
    let mut masks = Vec::with_capacity(values.len());
    let mut at = 0;
    for v in &values {
        masks.push(flat[at..at + v.len()].to_vec());
        at += v.len();
    }
    build(params, masks)
}

impl Pruning {
    /// Zeroes the pruned entries again (after an optimizer step has moved them).
    pub fn apply(&self) -> Result<()> {
        let _no_grad = crate::autograd::NoGradGuard::new();
        for (_, t, m) in &self.entries {
            t.assign(&t.mul(m)?)?;
        }
        Ok(())
    }

    /// The fraction of the masked entries that are pruned.
    pub fn sparsity(&self) -> Result<f32> {
        let (mut zeros, mut total) = (0usize, 0usize);
        for (_, _, m) in &self.entries {
            let v = m.to_vec()?;
            zeros += v.iter().filter(|&&x| x == 0.0).count();
            total += v.len();
        }
        Ok(zeros as f32 / total.max(1) as f32)
    }

    /// Each pruned parameter's name and mask.
    pub fn masks(&self) -> Vec<(String, Tensor)> {
        self.entries
            .iter()
            .map(|(n, _, m)| (n.clone(), m.clone()))
            .collect()
    }

    /// Applies the masks one last time and drops them: the zeros stay in the parameters.
    pub fn remove(self) -> Result<()> {
        self.apply()
    }
}

/// The squared L2 norm of each of `n` channels' rows of `rows` (the order of the L2 norms).
fn row_norms(rows: &[f32], n: usize) -> Vec<f32> {
    let per = rows.len() / n.max(1);
    (0..n)
        .map(|c| rows[c * per..(c + 1) * per].iter().map(|v| v * v).sum())
        .collect()
}

/// The kept indices of `n` channels: the `n - round(amount * n)` (at least one) with the
/// largest L2 norms of `rows` (one slice of `per` values per channel), in order.
fn keep_by_norm(rows: &[f32], n: usize, amount: f32) -> Vec<usize> {
    keep_by_score(&row_norms(rows, n), amount)
}

/// The kept indices of the channels of `norms`: the largest `n - round(amount * n)` (at least
/// one), in order.
fn keep_by_score(norms: &[f32], amount: f32) -> Vec<usize> {
    let n = norms.len();
    let drop = ((amount as f64 * n as f64).round() as usize).min(n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
    let mut keep = order[..n - drop].to_vec();
    keep.sort_unstable();
    keep
}

/// Pruned tensors by name: values and shape.
type Values = std::collections::HashMap<String, (Vec<f32>, Vec<usize>)>;

/// The batch norm at `prefix` (weight, bias and running statistics, those it has)
/// restricted to the channels `keep`, into `values`.
fn select_norm(
    state: &std::collections::HashMap<String, Tensor>,
    prefix: &str,
    keep: &[usize],
    values: &mut Values,
) -> Result<()> {
    for p in ["weight", "bias", "running_mean", "running_var"] {
        if let Some(t) = state.get(&format!("{prefix}.{p}")) {
            let v = t.to_vec()?;
            values.insert(format!("{prefix}.{p}"), select(&v, t.dims(), 0, keep));
        }
    }
    Ok(())
}

/// Adds each channel's norm of `rows` to its score.
fn add_norms(score: &mut [f32], rows: &[f32]) {
    let norms = row_norms(rows, score.len());
    for (s, v) in score.iter_mut().zip(norms) {
        *s += v;
    }
}

/// `values` of `shape` with axis `axis` restricted to `keep`.
fn select(values: &[f32], shape: &[usize], axis: usize, keep: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let dim = shape[axis];
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let at = (o * dim + k) * inner;
            out.extend_from_slice(&values[at..at + inner]);
        }
    }
    let mut s = shape.to_vec();
    s[axis] = keep.len();
    (out, s)
}

/// Structured channel pruning of a [`crate::nn::Sequential`] built from `spec`: each
/// convolution (groups 1) and linear layer but the last loses the `round(amount * n)` output
/// channels with the smallest filter L2 norms (as `torch.nn.utils.prune.ln_structured` with
/// `n = 2`), and the layers that read them lose the
/// matching inputs (batch norm, the next convolution, and after a flatten the linear layer's
/// columns of those channels). Returns the smaller model and its spec; its frozen graph is
/// smaller and faster, not merely full of zeros. Fine-tune it afterwards.
///
/// Residual blocks (`basicblock`) lose channels between their two convolutions, and the
/// channels a skip connection adds go on both branches alike: a block without a projection
/// adds its input to its output, so the layer before it and the second convolution of every
/// such block that follows keep one set of channels, chosen by the L2 norm of their filters
/// together; a projection (its 1x1 convolution and batch norm) starts a new set.
///
/// `Err` for an amount outside [0, 1), a spec that does not describe `model`, or a layer the
/// pruner cannot follow (grouped or transposed convolutions, embeddings, layer norms).
///
/// ```
/// use kiln::nn::{Init, Module, Sequential};
/// # let dev = kiln::Device::default_device()?;
/// let spec = "conv2d(1,8,3,p=1) relu flatten linear(512,10)";
/// let net = Sequential::from_spec(&mut Init::new(&dev, 0), spec)?;
/// let (small, small_spec) = kiln::prune::channels(&net, spec, 0.5, &mut Init::new(&dev, 1))?;
/// assert_eq!(small_spec, "conv2d(1,4,3,s=1,p=1,d=1,g=1,bias=true) relu flatten linear(256,10,bias=true)");
/// assert!(small.parameter_count() < net.parameter_count() / 2 + 10);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn channels(
    model: &crate::nn::Sequential,
    spec: &str,
    amount: f32,
    init: &mut crate::nn::Init,
) -> Result<(crate::nn::Sequential, String)> {
    use crate::spec::LayerSpec as L;
    const OP: &str = "prune::channels";
    if !(0.0..1.0).contains(&amount) {
        return Err(Error::invalid(
            OP,
            format!("the amount {amount} must be in [0, 1)"),
        ));
    }
    let layers = crate::spec::parse(spec)?;
    let tokens = crate::spec::tokens(spec)?;
    let state: std::collections::HashMap<String, Tensor> = model
        .state_dict()
        .into_iter()
        .map(|(n, t, _)| (n, t))
        .collect();
    // The model must be the spec's: every tensor of the shape the spec gives it.
    let reference = crate::nn::Sequential::from_spec(init, spec)?;
    let shapes: std::collections::HashMap<String, Vec<usize>> = reference
        .state_dict()
        .into_iter()
        .map(|(n, t, _)| (n, t.dims().to_vec()))
        .collect();
    drop(reference);
    let mismatch = shapes.len() != state.len()
        || state
            .iter()
            .any(|(n, t)| shapes.get(n).map(|s| s.as_slice()) != Some(t.dims()));
    if mismatch {
        return Err(Error::invalid(
            OP,
            "the model's tensors are not those of the spec: is it built from this spec?",
        ));
    }
    let get = |name: String| -> Result<(Vec<f32>, Vec<usize>)> {
        let t = state.get(&name).ok_or_else(|| {
            Error::invalid(
                OP,
                format!("the model has no {name}: is it built from this spec?"),
            )
        })?;
        Ok((t.to_vec()?, t.dims().to_vec()))
    };
    let last = layers
        .iter()
        .rposition(|l| matches!(l, L::Conv2d { .. } | L::Linear { .. }))
        .ok_or_else(|| Error::invalid(OP, "the spec has no convolution or linear layer"))?;
    let identity = |l: &L| {
        matches!(l, L::BasicBlock { in_channels, out_channels, stride, .. }
            if in_channels == out_channels && *stride == 1)
    };
    // The channels the output of layer i keeps, scored by `own` (its filter norms) plus the
    // second convolutions of the identity blocks after it, which add their output to these
    // same channels. All stay when those blocks give the model's output.
    let group_keep = |i: usize, own: Vec<f32>| -> Result<Vec<usize>> {
        let mut score = own;
        for (j, l) in layers.iter().enumerate().skip(i + 1) {
            match l {
                L::Activation { .. } | L::BatchNorm { .. } | L::Pool { .. } | L::Dropout { .. } => {
                }
                l if identity(l) => {
                    add_norms(&mut score, &get(format!("{j}.conv2.weight"))?.0);
                }
                // Pruned only where a later layer reads the channels (and loses its inputs);
                // otherwise they are the model's output.
                _ if layers[j..].iter().any(|l| {
                    matches!(
                        l,
                        L::Conv2d { .. } | L::Linear { .. } | L::BasicBlock { .. }
                    )
                }) =>
                {
                    return Ok(keep_by_score(&score, amount))
                }
                _ => break,
            }
        }
        Ok((0..score.len()).collect())
    };
    let mut new_tokens: Vec<String> = Vec::with_capacity(layers.len());
    let mut values = Values::new();
    // The kept channels of the current activation (all when None), its channel count, and
    // after a flatten the values per channel.
    let mut keep: Option<Vec<usize>> = None;
    let mut channels = 0usize;
    let mut per_channel: Option<usize> = None;
    // Where the pruned channels are: axis 1 after a convolution, the last axis after a
    // linear layer.
    let mut axis_last = false;
    let cannot = |token: &str| Error::invalid(OP, format!("cannot prune through {token}"));
    for (i, layer) in layers.iter().enumerate() {
        let token = tokens[i].to_string();
        match layer {
            L::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                dilation,
                groups,
                bias,
            } => {
                let reads_pruned = keep.is_some() && (axis_last || *in_channels != channels);
                if *groups != 1 || per_channel.is_some() || reads_pruned {
                    return Err(cannot(&token));
                }
                let (mut w, mut ws) = get(format!("{i}.weight"))?;
                if let Some(k) = &keep {
                    (w, ws) = select(&w, &ws, 1, k);
                }
                let out_keep = if i == last {
                    (0..*out_channels).collect()
                } else {
                    group_keep(i, row_norms(&w, *out_channels))?
                };
                let (w, ws) = select(&w, &ws, 0, &out_keep);
                values.insert(format!("{i}.weight"), (w, ws));
                if *bias {
                    let (b, bs) = get(format!("{i}.bias"))?;
                    values.insert(format!("{i}.bias"), select(&b, &bs, 0, &out_keep));
                }
                let new_in = keep.as_ref().map_or(*in_channels, |k| k.len());
                new_tokens.push(format!(
                    "conv2d({new_in},{},{kernel},s={stride},p={padding},d={dilation},g=1,bias={bias})",
                    out_keep.len()
                ));
                channels = *out_channels;
                axis_last = false;
                keep = (out_keep.len() != *out_channels).then_some(out_keep);
            }
            L::Linear {
                in_features,
                out_features,
                bias,
            } => {
                // Without a flatten, a linear layer reads the pruned channels only when they
                // are its input features.
                if keep.is_some()
                    && per_channel.is_none()
                    && (!axis_last || *in_features != channels)
                {
                    return Err(cannot(&token));
                }
                let (mut w, mut ws) = get(format!("{i}.weight"))?;
                let cols: Option<Vec<usize>> = match (&keep, per_channel) {
                    (Some(k), Some(per)) => {
                        Some(k.iter().flat_map(|&c| c * per..(c + 1) * per).collect())
                    }
                    (Some(k), None) => Some(k.clone()),
                    (None, _) => None,
                };
                if let Some(c) = &cols {
                    if c.iter().any(|&x| x >= *in_features) {
                        return Err(Error::invalid(
                            OP,
                            format!("{token} does not read the pruned channels"),
                        ));
                    }
                    (w, ws) = select(&w, &ws, 1, c);
                }
                let out_keep = if i == last {
                    (0..*out_features).collect()
                } else {
                    keep_by_norm(&w, *out_features, amount)
                };
                let (w, ws) = select(&w, &ws, 0, &out_keep);
                values.insert(format!("{i}.weight"), (w, ws));
                if *bias {
                    let (b, bs) = get(format!("{i}.bias"))?;
                    values.insert(format!("{i}.bias"), select(&b, &bs, 0, &out_keep));
                }
                let new_in = cols.as_ref().map_or(*in_features, |c| c.len());
                new_tokens.push(format!("linear({new_in},{},bias={bias})", out_keep.len()));
                channels = *out_features;
                per_channel = None;
                axis_last = true;
                keep = (out_keep.len() != *out_features).then_some(out_keep);
            }
            L::BatchNorm {
                channels: c,
                two_d,
                eps,
                momentum,
            } => {
                if let Some(k) = &keep {
                    // batchnorm2d normalises axis 1 of (N, C, H, W), batchnorm1d (N, C).
                    if *c != channels || per_channel.is_some() || *two_d == axis_last {
                        return Err(Error::invalid(
                            OP,
                            format!("{token} does not follow the pruned layer"),
                        ));
                    }
                    select_norm(&state, &format!("{i}"), k, &mut values)?;
                    let name = if *two_d { "batchnorm2d" } else { "batchnorm1d" };
                    new_tokens.push(format!("{name}({},eps={eps},momentum={momentum})", k.len()));
                } else {
                    new_tokens.push(token);
                }
            }
            L::Flatten { start, end } => {
                if keep.is_some() {
                    if (*start, *end) != (1, -1) || axis_last {
                        return Err(Error::invalid(OP, format!("cannot prune through {token}")));
                    }
                    // The next linear layer says how many values each channel became.
                    let next_in = layers[i + 1..].iter().find_map(|l| match l {
                        L::Linear { in_features, .. } => Some(*in_features),
                        _ => None,
                    });
                    match next_in {
                        Some(n) if channels > 0 && n % channels == 0 => {
                            per_channel = Some(n / channels)
                        }
                        _ => {
                            return Err(Error::invalid(
                                OP,
                                format!("cannot follow channels through {token}"),
                            ))
                        }
                    }
                }
                new_tokens.push(token);
            }
            L::BasicBlock {
                in_channels,
                out_channels,
                stride,
                mid,
            } => {
                let reads_pruned = keep.is_some() && *in_channels != channels;
                if per_channel.is_some() || axis_last || reads_pruned {
                    return Err(cannot(&token));
                }
                let same = identity(layer);
                let cols = |w: Vec<f32>, s: Vec<usize>| match &keep {
                    Some(k) => select(&w, &s, 1, k),
                    None => (w, s),
                };
                let bn = |values: &mut Values, name: &str, k: &[usize]| {
                    select_norm(&state, &format!("{i}.{name}"), k, values)
                };
                // The channels between the block's convolutions: conv1's outputs, bn1, and
                // conv2's inputs.
                let (w1, s1) = get(format!("{i}.conv1.weight"))?;
                let (w1, s1) = cols(w1, s1);
                let mid_keep = keep_by_norm(&w1, *mid, amount);
                values.insert(format!("{i}.conv1.weight"), select(&w1, &s1, 0, &mid_keep));
                bn(&mut values, "bn1", &mid_keep)?;
                let (w2, s2) = get(format!("{i}.conv2.weight"))?;
                let (w2, s2) = select(&w2, &s2, 1, &mid_keep);
                // The residual's channels: the input's own without a projection; else the
                // second convolution and the projection choose them together.
                let projection = (!same)
                    .then(|| get(format!("{i}.downsample.0.weight")))
                    .transpose()?;
                let out_keep = match (&projection, &keep) {
                    (None, Some(k)) => k.clone(),
                    (None, None) => (0..*out_channels).collect(),
                    (Some((wd, _)), _) => {
                        let mut own = row_norms(&w2, *out_channels);
                        add_norms(&mut own, wd);
                        group_keep(i, own)?
                    }
                };
                values.insert(format!("{i}.conv2.weight"), select(&w2, &s2, 0, &out_keep));
                bn(&mut values, "bn2", &out_keep)?;
                if let Some((wd, sd)) = projection {
                    let (wd, sd) = cols(wd, sd);
                    values.insert(
                        format!("{i}.downsample.0.weight"),
                        select(&wd, &sd, 0, &out_keep),
                    );
                    bn(&mut values, "downsample.1", &out_keep)?;
                }
                let new_in = keep.as_ref().map_or(*in_channels, |k| k.len());
                if !same && new_in == out_keep.len() && *stride == 1 {
                    return Err(Error::invalid(
                        OP,
                        format!("{token} would lose its projection: {new_in} channels in and out"),
                    ));
                }
                new_tokens.push(format!(
                    "basicblock({new_in},{},s={stride},mid={})",
                    out_keep.len(),
                    mid_keep.len()
                ));
                channels = *out_channels;
                keep = (out_keep.len() != *out_channels).then_some(out_keep);
            }
            L::Activation { .. }
            | L::Pool { .. }
            | L::Dropout { .. }
            | L::AdaptiveAvgPool { .. } => new_tokens.push(token),
            _ if keep.is_none() && i > last => new_tokens.push(token),
            _ => return Err(Error::invalid(OP, format!("cannot prune through {token}"))),
        }
    }
    let new_spec = new_tokens.join(" ");
    let small = crate::nn::Sequential::from_spec(init, &new_spec)?;
    let _no_grad = crate::autograd::NoGradGuard::new();
    for (name, t, _) in small.state_dict() {
        let src = match values.get(&name) {
            Some((v, s)) => Tensor::from_slice(v, s, t.device())?,
            None => state
                .get(&name)
                .cloned()
                .ok_or_else(|| Error::invalid(OP, format!("internal: {name} has no source")))?,
        };
        if src.dims() != t.dims() {
            return Err(Error::invalid(
                OP,
                format!(
                    "internal: {name} is {:?}, the pruned layer wants {:?}",
                    src.dims(),
                    t.dims()
                ),
            ));
        }
        t.assign(&src)?;
    }
    Ok((small, new_spec))
}
