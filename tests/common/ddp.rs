//! The data-parallel tests' oracle: the digits example's CNN trained in one process with the
//! global batch, on the same data order.

use kiln::data::{self, DataLoader, InMemoryDataset};
use kiln::nn::{Init, Module, Sequential};
use kiln::optim::{Optimizer, Sgd, SgdOptions};
use kiln::{Device, Result, Tensor};

/// The digits example's network (no batch norm or dropout, so a data-parallel step equals a
/// single-process step up to rounding).
pub const CNN: &str =
    "conv2d(1,16,3,p=1) relu conv2d(16,32,3,p=1) relu maxpool2d(2) flatten linear(512,64) relu linear(64,10)";
pub const STEPS: usize = 20;
pub const GLOBAL_BATCH: usize = 64;
pub const SHUFFLE_SEED: u64 = 1;

/// The loss of every step, and the final parameters by name.
pub type Run = (Vec<f32>, Vec<(String, Vec<f32>)>);

/// The example's optimizer.
pub fn sgd(params: Vec<Tensor>) -> Result<Sgd> {
    Sgd::new(
        params,
        SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        },
    )
}

/// The example's training split.
pub fn train_set() -> Result<InMemoryDataset> {
    Ok(data::digits()?.split(0.8, 0)?.0)
}

/// The loss of every step and the final parameters by name, of `STEPS` steps of batch
/// `GLOBAL_BATCH` in one process.
pub fn reference(dev: &Device) -> Result<Run> {
    let set = train_set()?;
    let model = Sequential::from_spec(&mut Init::new(dev, 0), CNN)?;
    let mut opt = sgd(model.parameters())?;
    let loader = DataLoader::new(&set, GLOBAL_BATCH, dev).shuffle(SHUFFLE_SEED);
    let mut losses = Vec::new();
    for batch in loader.epoch(0).take(STEPS) {
        let batch = batch?;
        let loss = kiln::loss::cross_entropy(
            &model.forward(&batch.inputs)?,
            &batch.targets,
            &Default::default(),
        )?;
        opt.zero_grad();
        loss.backward()?;
        opt.step()?;
        losses.push(loss.to_scalar()?);
    }
    Ok((losses, parameters(&model)?))
}

pub fn parameters(model: &dyn Module) -> Result<Vec<(String, Vec<f32>)>> {
    model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_vec()?)))
        .collect()
}

/// Checks the losses (relative) and the parameters (relative to magnitudes above 1) against
/// the reference within `1e-5`; returns the largest deviations.
pub fn compare(
    losses: &[f32],
    params: &[(String, Vec<f32>)],
    expected: &Run,
) -> std::result::Result<(f32, f32), String> {
    const TOL: f32 = 1e-5;
    if losses.len() != expected.0.len() {
        return Err(format!(
            "{} losses, expected {}",
            losses.len(),
            expected.0.len()
        ));
    }
    let mut worst_loss = 0f32;
    for (step, (a, b)) in losses.iter().zip(&expected.0).enumerate() {
        let rel = (a - b).abs() / b.abs();
        worst_loss = worst_loss.max(rel);
        if rel.is_nan() || rel > TOL {
            return Err(format!(
                "step {step}: loss {a}, single-process {b} (relative {rel:e})"
            ));
        }
    }
    if params.len() != expected.1.len() {
        return Err(format!(
            "{} parameters, expected {}",
            params.len(),
            expected.1.len()
        ));
    }
    let mut worst_param = 0f32;
    for ((name, a), (ename, b)) in params.iter().zip(&expected.1) {
        if name != ename || a.len() != b.len() {
            return Err(format!(
                "parameter {name} ({}) against {ename} ({})",
                a.len(),
                b.len()
            ));
        }
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let d = (x - y).abs() / y.abs().max(1.0);
            worst_param = worst_param.max(d);
            if d.is_nan() || d > TOL {
                return Err(format!("{name}[{i}] = {x}, single-process {y}"));
            }
        }
    }
    Ok((worst_loss, worst_param))
}
