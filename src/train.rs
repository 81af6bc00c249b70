//! A training loop: epochs, loss (cross-entropy for classifiers, or any loss closure, for
//! example MSE for a regression on tensor targets) and accuracy, evaluation on a held-out
//! split, a progress line on a terminal, and an error naming the step whose loss is not finite.
//!
//! The loop reads data back a few times per epoch (for the progress line and the epoch's
//! totals), never once per step.

use std::io::Write;
use std::time::Instant;

use crate::autograd::no_grad;
use crate::data::DataLoader;
use crate::error::{Error, Result};
use crate::loss::{cross_entropy, CrossEntropyOptions, Reduction};
use crate::nn::Module;
use crate::optim::{clip_grad_norm, LrSchedule, Optimizer};
use crate::tensor::Tensor;

/// What one epoch did.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    /// 0-based epoch number.
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f32,
    /// Mean training loss over the epoch's samples.
    pub train_loss: f32,
    /// Fraction of training samples classified correctly (while training); `None` with a
    /// custom loss.
    pub train_accuracy: Option<f32>,
    /// Loss on the evaluation set, when one was given.
    pub eval_loss: Option<f32>,
    /// Accuracy on the evaluation set, when one was given and the loss is cross-entropy.
    pub eval_accuracy: Option<f32>,
    /// Wall-clock seconds of the epoch, evaluation included.
    pub seconds: f64,
    /// The mean loss of each step of the epoch (read back with the epoch's totals, not per
    /// step).
    pub step_losses: Vec<f32>,
    /// True when this epoch's evaluation loss was the best so far (and, with
    /// [`FitOptions::save_best`], saved).
    pub best: bool,
}

/// When [`fit`] stops early, as Keras' and Lightning's `EarlyStopping` on the evaluation loss.
///
/// ```
/// use kiln::train::{EarlyStopping, FitOptions};
/// let options = FitOptions {
///     epochs: 100,
///     early_stopping: Some(EarlyStopping { patience: 5, min_delta: 1e-4 }),
///     ..Default::default()
/// };
/// assert_eq!(options.early_stopping.unwrap().patience, 5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EarlyStopping {
    /// Epochs without improvement before stopping.
    pub patience: usize,
    /// The smallest decrease of the evaluation loss that counts as an improvement.
    pub min_delta: f32,
}

/// A loss of a batch: the model's output and the batch's targets to a one-element mean.
pub type LossFn<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Result<Tensor>;

/// Options of [`fit`].
pub struct FitOptions<'a> {
    /// Number of epochs.
    pub epochs: usize,
    /// Learning rate per epoch (the optimizer's own rate when `None`).
    pub schedule: Option<&'a dyn LrSchedule>,
    /// Learning rate per optimizer step, counted across epochs (for warm-ups and per-step
    /// decays; compose them with [`crate::optim::Chained`]). Overrides `schedule`.
    pub step_schedule: Option<&'a dyn LrSchedule>,
    /// Stop when the evaluation loss has not improved by more than `min_delta` for
    /// `patience` epochs (needs an evaluation loader).
    pub early_stopping: Option<EarlyStopping>,
    /// Save a checkpoint (model and optimizer, [`crate::checkpoint::save`]) here whenever the
    /// evaluation loss is the best so far (needs an evaluation loader).
    pub save_best: Option<&'a std::path::Path>,
    /// Clip gradients to this global norm before each step.
    pub clip_grad_norm: Option<f32>,
    /// Where to write one summary line per epoch (a log file, `std::io::stdout()`, ...).
    pub progress: Option<&'a mut dyn Write>,
    /// A live progress bar of the epoch's steps and running loss on standard error, when it is
    /// a terminal (nothing otherwise, so logs stay one line per epoch). Needs the `progress`
    /// feature (on by default).
    pub progress_bar: bool,
    /// The loss of a batch, from the model's output and the batch's targets: a one-element
    /// mean over the batch (for example `|y, t| mse_loss(y, t, Reduction::Mean)`). `None`
    /// means cross-entropy on class labels, with accuracy.
    pub loss: Option<LossFn<'a>>,
}

impl Default for FitOptions<'_> {
    fn default() -> Self {
        FitOptions {
            epochs: 1,
            schedule: None,
            step_schedule: None,
            early_stopping: None,
            save_best: None,
            clip_grad_norm: None,
            progress: None,
            progress_bar: false,
            loss: None,
        }
    }
}

/// The loss of a batch (a one-element mean) from a custom loss, checked, for `op`.
pub(crate) fn custom_loss(
    op: &'static str,
    f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    outputs: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let l = f(outputs, targets)?;
    if l.numel() != 1 {
        return Err(Error::shape(
            op,
            format!(
                "the loss must have one element (a mean over the batch), got shape {:?}",
                l.dims()
            ),
        ));
    }
    l.reshape(&[])
}

/// Sum of cross-entropy and number of correct predictions of `logits` for `targets`, as GPU
/// scalars.
fn batch_totals(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    no_grad(|| {
        let loss = cross_entropy(
            logits,
            targets,
            &CrossEntropyOptions {
                reduction: Reduction::Sum,
                ..Default::default()
            },
        )?;
        let correct = logits.argmax(-1, false)?.eq(targets)?.sum_all()?;
        Ok((loss, correct))
    })
}

/// Logits of a batch of `n` must be `(n, classes)`: a model with the wrong number of outputs
/// would otherwise train on out-of-range targets.
fn check_logits(logits: &Tensor, n: usize, classes: usize) -> Result<()> {
    if logits.dims() != [n, classes] {
        return Err(Error::shape(
            "fit",
            format!(
                "the model's output has shape {:?}, but a batch of {n} samples of a {classes}-class dataset needs logits ({n}, {classes})",
                logits.dims()
            ),
        ));
    }
    Ok(())
}

fn sum_scalars(v: &[Tensor]) -> Result<Vec<f32>> {
    if v.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<Tensor> = v.iter().map(|t| t.reshape(&[1])).collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = parts.iter().collect();
    Tensor::concat(&refs, 0)?.to_vec()
}

/// Trains a model: for each epoch, every batch of `train` runs forward, the loss
/// (cross-entropy on class labels, or [`FitOptions::loss`]), backward and an optimizer step;
/// then `eval` (if any) is scored. Returns one report
/// per epoch. A non-finite loss stops training with an error naming the epoch and step; logits
/// that are not `(batch, classes)` for the dataset's class count are an error at the first
/// batch, before any step.
pub fn fit(
    model: &mut dyn Module,
    optimizer: &mut dyn Optimizer,
    train: &DataLoader<'_>,
    eval: Option<&DataLoader<'_>>,
    mut options: FitOptions<'_>,
) -> Result<Vec<EpochReport>> {
    let mut reports = Vec::with_capacity(options.epochs);
    let steps = train.len();
    let progress_every = (steps / 10).max(1);
    if eval.is_none() && (options.early_stopping.is_some() || options.save_best.is_some()) {
        return Err(Error::invalid(
            "fit",
            "early stopping and save_best watch the evaluation loss: give an evaluation loader",
        ));
    }
    let mut best = f32::INFINITY;
    let mut since_best = 0usize;
    for epoch in 0..options.epochs {
        let start = Instant::now();
        if let Some(s) = options.schedule {
            optimizer.set_lr(s.lr_at(epoch));
        }
        model.set_training(true);
        let mut losses = Vec::with_capacity(steps);
        let mut correct = Vec::with_capacity(steps);
        let mut seen = 0usize;
        let mut sizes = Vec::with_capacity(steps);
        let mut bar = Bar::new(options.progress_bar, steps, epoch, options.epochs);
        for (step, batch) in train.epoch(epoch).enumerate() {
            let batch = batch?;
            let n = batch.len;
            sizes.push(n);
            if let Some(s) = options.step_schedule {
                optimizer.set_lr(s.lr_at(epoch * steps + step));
            }
            let logits = model.forward(&batch.inputs)?;
            let loss = match options.loss {
                Some(f) => custom_loss("fit", f, &logits, &batch.targets)?,
                None => {
                    check_logits(&logits, n, train.dataset().num_classes())?;
                    cross_entropy(&logits, &batch.targets, &Default::default())?
                }
            };
            optimizer.zero_grad();
            loss.backward()?;
            if let Some(max) = options.clip_grad_norm {
                clip_grad_norm(optimizer.params(), max)?;
            }
            optimizer.step()?;
            let sum = match options.loss {
                Some(_) => loss.detach().mul_scalar(n as f32)?,
                None => {
                    let (sum, right) = batch_totals(&logits.detach(), &batch.targets)?;
                    correct.push(right);
                    sum
                }
            };
            losses.push(sum);
            seen += n;
            if bar.is_live() && ((step + 1) % progress_every == 0 || step + 1 == steps) {
                // The running loss needs a readback: a few per epoch, only for a live bar.
                let total: f32 = sum_scalars(&losses)?.iter().sum();
                bar.update(step + 1, total / seen as f32);
            }
        }
        bar.finish();
        let loss_values = sum_scalars(&losses)?;
        if let Some(bad) = loss_values.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "fit",
                format!(
                    "loss became {} at epoch {} step {} (global step {})",
                    loss_values[bad],
                    epoch + 1,
                    bad + 1,
                    epoch * steps + bad + 1
                ),
            ));
        }
        let train_loss = loss_values.iter().sum::<f32>() / seen.max(1) as f32;
        let train_accuracy = match options.loss {
            Some(_) => None,
            None => Some(sum_scalars(&correct)?.iter().sum::<f32>() / seen.max(1) as f32),
        };
        let (eval_loss, eval_accuracy) = match (eval, options.loss) {
            (Some(loader), None) => {
                let (l, a) = evaluate(model, loader)?;
                (Some(l), Some(a))
            }
            (Some(loader), Some(f)) => (Some(evaluate_loss(model, loader, f)?), None),
            (None, _) => (None, None),
        };
        let improved = eval_loss.is_some_and(|l| l < best);
        if let Some(l) = eval_loss {
            match options.early_stopping {
                Some(es) if l >= best - es.min_delta => since_best += 1,
                _ => since_best = 0,
            }
            best = best.min(l);
        }
        if improved {
            if let Some(path) = options.save_best {
                crate::checkpoint::save(path, model, Some(optimizer), None)?;
            }
        }
        let report = EpochReport {
            epoch,
            lr: optimizer.lr(),
            train_loss,
            train_accuracy,
            eval_loss,
            eval_accuracy,
            seconds: start.elapsed().as_secs_f64(),
            step_losses: loss_values
                .iter()
                .zip(&sizes)
                .map(|(s, &n)| s / n.max(1) as f32)
                .collect(),
            best: improved,
        };
        if let Some(out) = options.progress.as_mut() {
            let eval_part = match (eval_loss, eval_accuracy) {
                (Some(l), Some(a)) => format!("  eval loss {l:.4} acc {:.2}%", a * 100.0),
                (Some(l), None) => format!("  eval loss {l:.4}"),
                _ => String::new(),
            };
            let acc = train_accuracy.map_or(String::new(), |a| format!(" acc {:.2}%", a * 100.0));
            let _ = writeln!(
                out,
                "epoch {:>3}/{}  loss {:.4}{acc}{eval_part}  {:.2} s",
                epoch + 1,
                options.epochs,
                train_loss,
                report.seconds,
            );
        }
        reports.push(report);
        if options
            .early_stopping
            .is_some_and(|es| since_best >= es.patience.max(1))
        {
            if let Some(out) = options.progress.as_mut() {
                let _ = writeln!(
                    out,
                    "stopping early: no improvement of the evaluation loss for {since_best} epochs"
                );
            }
            break;
        }
    }
    Ok(reports)
}

/// The live progress bar of one epoch (a no-op without a terminal or the `progress` feature).
struct Bar {
    #[cfg(feature = "progress")]
    bar: Option<indicatif::ProgressBar>,
}

impl Bar {
    fn new(wanted: bool, steps: usize, epoch: usize, epochs: usize) -> Bar {
        #[cfg(feature = "progress")]
        {
            use std::io::IsTerminal;
            let bar = (wanted && std::io::stderr().is_terminal()).then(|| {
                let bar = indicatif::ProgressBar::new(steps as u64);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {msg} {elapsed}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
                bar
            });
            Bar { bar }
        }
        #[cfg(not(feature = "progress"))]
        {
            let _ = (wanted, steps, epoch, epochs);
            Bar {}
        }
    }

    fn is_live(&self) -> bool {
        #[cfg(feature = "progress")]
        return self.bar.is_some();
        #[cfg(not(feature = "progress"))]
        false
    }

    fn update(&mut self, done: usize, loss: f32) {
        #[cfg(feature = "progress")]
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
            b.set_message(format!("loss {loss:.4}"));
        }
        #[cfg(not(feature = "progress"))]
        let _ = (done, loss);
    }

    fn finish(&mut self) {
        #[cfg(feature = "progress")]
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Mean of a custom per-batch loss (see [`FitOptions::loss`]) of `model` over `loader`,
/// weighted by batch size, in eval mode without a graph (the model is left in eval mode).
pub fn evaluate_loss(
    model: &mut dyn Module,
    loader: &DataLoader<'_>,
    loss: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<f32> {
    model.set_training(false);
    let mut sums = Vec::with_capacity(loader.len());
    let mut seen = 0usize;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let outputs = no_grad(|| model.forward(&batch.inputs))?;
        let l = no_grad(|| custom_loss("evaluate_loss", loss, &outputs, &batch.targets))?;
        sums.push(l.mul_scalar(batch.len as f32)?);
        seen += batch.len;
    }
    Ok(sum_scalars(&sums)?.iter().sum::<f32>() / seen.max(1) as f32)
}

/// Mean cross-entropy and accuracy of `model` over `loader`, in eval mode without a graph
/// (the model is left in eval mode).
pub fn evaluate(model: &mut dyn Module, loader: &DataLoader<'_>) -> Result<(f32, f32)> {
    model.set_training(false);
    let mut losses = Vec::with_capacity(loader.len());
    let mut correct = Vec::with_capacity(loader.len());
    let mut seen = 0usize;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let logits = no_grad(|| model.forward(&batch.inputs))?;
        check_logits(&logits, batch.labels.len(), loader.dataset().num_classes())?;
        let (l, c) = batch_totals(&logits, &batch.targets)?;
        losses.push(l);
        correct.push(c);
        seen += batch.labels.len();
    }
    let loss: f32 = sum_scalars(&losses)?.iter().sum();
    let right: f32 = sum_scalars(&correct)?.iter().sum();
    Ok((loss / seen.max(1) as f32, right / seen.max(1) as f32))
}
