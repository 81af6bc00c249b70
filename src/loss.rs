//! Loss functions, with PyTorch's semantics and defaults.
//!
//! Class-index targets are i32 tensors, or f32 tensors holding integers. They stay on the GPU, so a target
//! outside `0..C` (other than `ignore_index`), or a fractional one, is reported by the kernel
//! that reads it: the next readback (of the loss or anything else) is an `Err` naming the
//! value. `kiln::train::fit` also checks the logits' shape against the dataset's class count
//! before its first step.

use crate::autograd::{no_grad, record, Op};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// How per-element losses are combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// The mean (over the non-ignored elements, for class-index losses).
    #[default]
    Mean,
    /// The sum.
    Sum,
    /// No reduction: one loss per element.
    None,
}

/// Options of [`cross_entropy`] (PyTorch's defaults by `Default`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossEntropyOptions {
    /// How to combine the per-element losses.
    pub reduction: Reduction,
    /// Mixes the one-hot target with the uniform distribution: `(1 - s) * onehot + s / C`.
    pub label_smoothing: f32,
    /// Targets equal to this class contribute nothing and are not counted in the mean.
    pub ignore_index: Option<usize>,
}

fn reduce(per_element: Tensor, reduction: Reduction, count: Option<Tensor>) -> Result<Tensor> {
    match reduction {
        Reduction::None => Ok(per_element),
        Reduction::Sum => per_element.sum_all(),
        Reduction::Mean => match count {
            Some(c) => per_element.sum_all()?.div(&c),
            None => per_element.mean_all(),
        },
    }
}

/// Checks logits `(N, C, d...)` against targets `(N, d...)` (or `(C)` against `()`).
/// Class targets as the kernels read them: i32 targets cast to f32 (exact below 2^24 classes).
fn class_targets(op: &'static str, scores: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let classes = if scores.rank() == 1 {
        scores.dims()[0]
    } else {
        scores.dim(1).unwrap_or(0)
    };
    targets.as_f32_indices(op, classes)
}

fn check_class_shapes(op: &'static str, scores: &Tensor, targets: &Tensor) -> Result<()> {
    let ok = match scores.rank() {
        0 => false,
        1 => targets.rank() == 0,
        _ => {
            let mut want = scores.shape();
            want.remove(1);
            targets.dims() == want.as_slice()
        }
    };
    if !ok {
        return Err(Error::shape(
            op,
            format!(
                "scores of shape {:?} (N, C, ...) need targets of shape (N, ...), got {:?}",
                scores.dims(),
                targets.dims()
            ),
        ));
    }
    scores.check_device(op, targets)
}

/// Negative log-likelihood of class-index `targets` under `log_probs` of shape `(N, C, ...)`,
/// masked by `ignore_index`; returns (per-element loss, non-ignored count if ignoring).
fn nll_terms(
    op: &'static str,
    log_probs: &Tensor,
    targets: &Tensor,
    label_smoothing: f32,
    ignore_index: Option<usize>,
) -> Result<(Tensor, Option<Tensor>)> {
    check_class_shapes(op, log_probs, targets)?;
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::invalid(
            op,
            format!("label_smoothing must be in [0, 1], got {label_smoothing}"),
        ));
    }
    // A single sample (C) is treated as a batch of one.
    let (lp, t) = if log_probs.rank() == 1 {
        (log_probs.unsqueeze(0)?, targets.unsqueeze(0)?)
    } else {
        (log_probs.clone(), targets.clone())
    };
    let (mask, t) = match ignore_index {
        Some(ignore) => {
            let mask = t.ne_scalar(ignore as f32)?;
            // Ignored targets pick class 0, then the mask zeroes their term.
            let safe = mask.where_cond(&t, &Tensor::zeros(&[], t.device())?)?;
            (Some(mask), safe)
        }
        None => (None, t),
    };
    let picked = lp.gather(1, &t.unsqueeze(1)?)?.squeeze(Some(1))?;
    let mut loss = picked.neg()?;
    if label_smoothing > 0.0 {
        // (1 - s) * nll + s * mean over classes of -log p
        let smooth = lp.mean(&[1], false)?.neg()?;
        loss = loss
            .mul_scalar(1.0 - label_smoothing)?
            .add(&smooth.mul_scalar(label_smoothing)?)?;
    }
    let count = match &mask {
        Some(m) => {
            loss = loss.mul(m)?;
            Some(m.sum_all()?)
        }
        None => None,
    };
    if log_probs.rank() == 1 {
        loss = loss.squeeze(Some(0))?;
    }
    Ok((loss, count))
}

/// Cross-entropy of raw scores (logits) `(N, C)` or `(N, C, d...)` against class-index targets
/// `(N)` or `(N, d...)`, as `torch.nn.functional.cross_entropy`: computed through log_softmax,
/// so it is stable for large logits.
///
/// ```
/// use kiln::{loss, Tensor};
/// # let dev = kiln::Device::default_device()?;
/// let logits = Tensor::from_slice(&[2.0, 0.0, 0.0, 0.0, 3.0, 0.0], &[2, 3], &dev)?.requires_grad();
/// let targets = Tensor::from_slice(&[0.0, 1.0], &[2], &dev)?;
/// let l = loss::cross_entropy(&logits, &targets, &Default::default())?;
/// l.backward()?;
/// assert!(l.to_scalar()? > 0.0);
/// assert_eq!(logits.grad().unwrap().dims(), &[2, 3]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    check_class_shapes(OP, logits, targets)?;
    let targets = &class_targets(OP, logits, targets)?;
    let axis = if logits.rank() == 1 { 0 } else { 1 };
    let log_probs = logits.log_softmax(axis)?;
    let (per, count) = nll_terms(
        OP,
        &log_probs,
        targets,
        options.label_smoothing,
        options.ignore_index,
    )?;
    reduce(per, options.reduction, count)
}

/// Negative log-likelihood of class-index targets given log-probabilities `(N, C, ...)`, as
/// `torch.nn.functional.nll_loss`.
pub fn nll_loss(
    log_probs: &Tensor,
    targets: &Tensor,
    reduction: Reduction,
    ignore_index: Option<usize>,
) -> Result<Tensor> {
    const OP: &str = "nll_loss";
    check_class_shapes(OP, log_probs, targets)?;
    let targets = &class_targets(OP, log_probs, targets)?;
    let (per, count) = nll_terms(OP, log_probs, targets, 0.0, ignore_index)?;
    reduce(per, reduction, count)
}

/// Mean squared error `(pred - target)^2`. Shapes must be equal (a silent broadcast of
/// `(N, 1)` against `(N)` is a classic bug, so it is an error here).
///
/// ```
/// # let dev = kiln::Device::default_device()?;
/// let p = kiln::Tensor::from_slice(&[1.0, 2.0], &[2], &dev)?;
/// let t = kiln::Tensor::from_slice(&[0.0, 4.0], &[2], &dev)?;
/// assert_eq!(kiln::loss::mse_loss(&p, &t, kiln::loss::Reduction::Mean)?.to_scalar()?, 2.5);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn mse_loss(pred: &Tensor, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
    const OP: &str = "mse_loss";
    if pred.dims() != target.dims() {
        return Err(Error::shape(
            OP,
            format!(
                "prediction shape {:?} differs from target shape {:?}",
                pred.dims(),
                target.dims()
            ),
        ));
    }
    let d = pred.sub(target)?;
    reduce(d.mul(&d)?, reduction, None)
}

/// Binary cross-entropy of logits against targets in `[0, 1]` of the same shape, as
/// `torch.nn.functional.binary_cross_entropy_with_logits`: `max(x, 0) - x t + log(1 + e^-|x|)`,
/// stable for any logit, with gradients `sigmoid(x) - t` for the logits and `-x` for the
/// targets (soft targets that are themselves computed get a gradient, as in PyTorch).
pub fn binary_cross_entropy_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    const OP: &str = "binary_cross_entropy_with_logits";
    if logits.dims() != targets.dims() {
        return Err(Error::shape(
            OP,
            format!(
                "logits shape {:?} differs from targets shape {:?}",
                logits.dims(),
                targets.dims()
            ),
        ));
    }
    logits.check_device(OP, targets)?;
    let out = no_grad(|| -> Result<Tensor> {
        let x = logits;
        let per = x
            .relu()?
            .sub(&x.mul(targets)?)?
            .add(&x.abs()?.neg()?.exp()?.add_scalar(1.0)?.log()?)?;
        reduce(per, reduction, None)
    })?;
    let scale = match reduction {
        Reduction::Mean => 1.0 / logits.numel().max(1) as f32,
        _ => 1.0,
    };
    Ok(record(out, &[logits, targets], |_| Op::BceWithLogits {
        x: logits.detach(),
        t: targets.detach(),
        scale,
    }))
}
