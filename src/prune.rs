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
