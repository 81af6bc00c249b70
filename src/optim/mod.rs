//! Optimizers that update parameters in place on the GPU (one fused dispatch per parameter
//! tensor), gradient clipping by global norm, and learning-rate schedules. The update formulas
//! and defaults are PyTorch's.

mod schedule;

use bytemuck::{Pod, Zeroable};

pub use schedule::{Chained, CosineAnnealing, LinearWarmup, LrSchedule, StepDecay};

use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::grid;
use crate::tensor::Tensor;

/// Uniform parameters of `shaders/optim.wgsl` (its `Params` struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct OptimParams {
    pub n: u32,
    pub flags: u32,
    pub off_p: u32,
    pub off_g: u32,
    pub lr: f32,
    pub momentum: f32,
    pub dampening: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub bias_correction1: f32,
    pub bias_correction2_sqrt: f32,
    pub _pad: [u32; 3],
}

const FLAG_NESTEROV: u32 = 1;
const FLAG_FIRST_STEP: u32 = 2;
const FLAG_DECOUPLED: u32 = 4;
const FLAG_MAXIMIZE: u32 = 8;

/// An optimizer over a fixed list of parameters (leaf tensors that require grad).
pub trait Optimizer {
    /// Applies one update from the parameters' current gradients. Parameters without a
    /// gradient are skipped (as in PyTorch). Records GPU work only: nothing is read back.
    fn step(&mut self) -> Result<()>;

    /// Clears every parameter's gradient.
    fn zero_grad(&self) {
        for p in self.params() {
            p.zero_grad();
        }
    }

    /// The parameters being optimized.
    fn params(&self) -> &[Tensor];

    /// The learning rate of the next step.
    fn lr(&self) -> f32;

    /// Sets the learning rate (for schedules).
    fn set_lr(&mut self, lr: f32);

    /// Named state tensors (for checkpoints): `"{index}.{name}"` for each parameter index.
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Number of steps taken.
    fn steps(&self) -> u64;

    /// Sets the number of steps taken (when resuming from a checkpoint).
    fn set_steps(&mut self, steps: u64);

    /// Restores one named state tensor, as listed by [`Optimizer::state`]. On `Err` nothing
    /// is changed.
    fn set_state(&mut self, name: &str, value: &Tensor) -> Result<()>;

    /// Checks, without changing anything, that [`Optimizer::set_state`] would take `value`
    /// for `name` (checkpoint loading checks every tensor before it writes any). The default
    /// accepts everything; the optimizers of this crate check the name, shape and device.
    fn check_state(&self, name: &str, value: &Tensor) -> Result<()> {
        let _ = (name, value);
        Ok(())
    }
}

/// Splits `"{index}.{kind}"` and checks the index and the shape against the parameters.
fn state_slot<'a>(
    op: &'static str,
    params: &[Tensor],
    name: &'a str,
    value: &Tensor,
    scalar: bool,
) -> Result<(usize, &'a str)> {
    let (index, kind) = name
        .split_once('.')
        .and_then(|(i, k)| i.parse::<usize>().ok().map(|i| (i, k)))
        .ok_or_else(|| Error::invalid(op, format!("state name {name} is not <index>.<kind>")))?;
    let param = params.get(index).ok_or_else(|| {
        Error::invalid(
            op,
            format!("state {name} names parameter {index} of {}", params.len()),
        )
    })?;
    param.check_device(op, value)?;
    let want: &[usize] = if scalar { &[] } else { param.dims() };
    if value.dims() != want {
        return Err(Error::shape(
            op,
            format!(
                "state {name} has shape {:?}, expected {want:?}",
                value.dims()
            ),
        ));
    }
    Ok((index, kind))
}

/// A private copy of `value` for optimizer state.
fn owned_copy(value: &Tensor) -> Result<Tensor> {
    no_grad(|| value.detach().add_scalar(0.0))
}

fn check_params(op: &'static str, params: &[Tensor]) -> Result<()> {
    // An optimizer over nothing would "train" without changing anything: a module whose
    // parameters were never registered is the usual cause.
    if params.is_empty() {
        return Err(Error::invalid(
            op,
            "no parameters to optimize (does the module list its tensors in `visit`?)",
        ));
    }
    for (i, p) in params.iter().enumerate() {
        p.check_float(op)?;
        if !p.requires_grad_flag() || !p.is_leaf() {
            return Err(Error::invalid(
                op,
                format!(
                    "parameter {i} (shape {:?}) is not a leaf that requires grad",
                    p.dims()
                ),
            ));
        }
        if !p.is_contiguous() {
            return Err(Error::invalid(
                op,
                format!("parameter {i} (shape {:?}) is not contiguous", p.dims()),
            ));
        }
    }
    Ok(())
}

fn check_hyper(
    op: &'static str,
    name: &str,
    v: f32,
    range: std::ops::RangeInclusive<f32>,
) -> Result<()> {
    if !range.contains(&v) {
        return Err(Error::invalid(
            op,
            format!("{name} = {v} is outside {range:?}"),
        ));
    }
    Ok(())
}

fn launch(kernel: Kernel, param: &Tensor, grad: &Tensor, states: &[&Tensor], p: OptimParams) {
    // In-place writes: a graph that saved the parameter for backward sees it changed.
    param.bump_version();
    states.iter().for_each(|s| s.bump_version());
    let mut outputs = vec![param.buffer()];
    outputs.extend(states.iter().map(|s| s.buffer()));
    // Whole vec4s at aligned offsets (the state buffers start at 0).
    let aligned = [p.n, p.off_p, p.off_g].iter().all(|v| v.is_multiple_of(4));
    let (kernel, per) = crate::ops::tune::optimizer_step(kernel, aligned);
    param.device().dispatch_outputs(
        kernel,
        &[grad.buffer()],
        &outputs,
        bytemuck::bytes_of(&p),
        grid((p.n as usize).div_ceil(per), 256),
    );
}

fn base_params(param: &Tensor, grad: &Tensor, lr: f32, flags: u32) -> OptimParams {
    OptimParams {
        n: param.numel() as u32,
        flags,
        off_p: param.layout.offset as u32,
        off_g: grad.layout.offset as u32,
        lr,
        ..Zeroable::zeroed()
    }
}

/// Options of [`Sgd`] (PyTorch's defaults by `Default`, with `lr` 0.01).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdOptions {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor (0 disables the momentum buffer).
    pub momentum: f32,
    /// Dampening of the gradient added to the momentum buffer.
    pub dampening: f32,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for SgdOptions {
    fn default() -> Self {
        SgdOptions {
            lr: 0.01,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

/// Stochastic gradient descent with optional momentum, Nesterov, dampening and weight decay,
/// as `torch.optim.SGD`.
///
/// ```
/// use kiln::optim::{Optimizer, Sgd, SgdOptions};
/// # let dev = kiln::Device::default_device()?;
/// let w = kiln::Tensor::from_slice(&[1.0, -1.0], &[2], &dev)?.requires_grad();
/// let mut opt = Sgd::new(vec![w.clone()], SgdOptions { lr: 0.5, ..Default::default() })?;
/// w.mul(&w)?.sum_all()?.backward()?; // gradient 2w
/// opt.step()?;
/// assert_eq!(w.to_vec()?, vec![0.0, 0.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Sgd {
    params: Vec<Tensor>,
    momentum_buffers: Vec<Option<Tensor>>,
    options: SgdOptions,
    steps: u64,
}

impl Sgd {
    /// An optimizer over `params`.
    pub fn new(params: Vec<Tensor>, options: SgdOptions) -> Result<Sgd> {
        const OP: &str = "Sgd::new";
        check_params(OP, &params)?;
        check_hyper(OP, "lr", options.lr, 0.0..=f32::MAX)?;
        check_hyper(OP, "momentum", options.momentum, 0.0..=f32::MAX)?;
        check_hyper(OP, "weight_decay", options.weight_decay, 0.0..=f32::MAX)?;
        if options.nesterov && (options.momentum <= 0.0 || options.dampening != 0.0) {
            return Err(Error::invalid(
                OP,
                "Nesterov momentum needs momentum > 0 and zero dampening",
            ));
        }
        let n = params.len();
        Ok(Sgd {
            params,
            momentum_buffers: vec![None; n],
            options,
            steps: 0,
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        let o = self.options;
        let mut flags = 0;
        if o.nesterov {
            flags |= FLAG_NESTEROV;
        }
        if o.maximize {
            flags |= FLAG_MAXIMIZE;
        }
        for (param, buf) in self.params.iter().zip(self.momentum_buffers.iter_mut()) {
            let Some(grad) = param.grad() else { continue };
            let mut p = base_params(param, &grad, o.lr, flags);
            p.weight_decay = o.weight_decay;
            if o.momentum == 0.0 {
                launch(Kernel::SgdStep, param, &grad, &[], p);
                continue;
            }
            p.momentum = o.momentum;
            p.dampening = o.dampening;
            if buf.is_none() {
                p.flags |= FLAG_FIRST_STEP;
                *buf = Some(Tensor::uninit("Sgd::step", param.dims(), param.device())?);
            }
            if let Some(b) = buf {
                launch(Kernel::SgdMomentumStep, param, &grad, &[b], p);
            }
        }
        self.steps += 1;
        Ok(())
    }

    fn params(&self) -> &[Tensor] {
        &self.params
    }

    fn lr(&self) -> f32 {
        self.options.lr
    }

    fn set_lr(&mut self, lr: f32) {
        self.options.lr = lr;
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.momentum_buffers
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                b.as_ref()
                    .map(|b| (format!("{i}.momentum_buffer"), b.clone()))
            })
            .collect()
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    fn set_state(&mut self, name: &str, value: &Tensor) -> Result<()> {
        self.check_state(name, value)?;
        let (i, _) = state_slot("Sgd::set_state", &self.params, name, value, false)?;
        self.momentum_buffers[i] = Some(owned_copy(value)?);
        Ok(())
    }

    fn check_state(&self, name: &str, value: &Tensor) -> Result<()> {
        const OP: &str = "Sgd::set_state";
        match state_slot(OP, &self.params, name, value, false)? {
            (_, "momentum_buffer") => Ok(()),
            (_, kind) => Err(Error::invalid(
                OP,
                format!("unknown state {kind} in {name}"),
            )),
        }
    }
}

/// Options of [`Adam`] (PyTorch's defaults by `Default`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamOptions {
    /// Learning rate.
    pub lr: f32,
    /// Decay rates of the first and second moment estimates.
    pub betas: (f32, f32),
    /// Added to the denominator for stability.
    pub eps: f32,
    /// Weight decay: an L2 term in the gradient (Adam), or decoupled (AdamW).
    pub weight_decay: f32,
    /// Decoupled weight decay (AdamW).
    pub decoupled_weight_decay: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for AdamOptions {
    fn default() -> Self {
        AdamOptions {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            maximize: false,
        }
    }
}

impl AdamOptions {
    /// AdamW's defaults: decoupled weight decay of 0.01.
    pub fn adamw() -> Self {
        AdamOptions {
            weight_decay: 1e-2,
            decoupled_weight_decay: true,
            ..Default::default()
        }
    }
}

/// Adam, and AdamW with `decoupled_weight_decay`, as `torch.optim.Adam` / `torch.optim.AdamW`
/// (without amsgrad).
pub struct Adam {
    params: Vec<Tensor>,
    moments: Vec<Option<(Tensor, Tensor)>>,
    step_counts: Vec<u64>,
    options: AdamOptions,
    steps: u64,
}

impl Adam {
    /// An optimizer over `params`.
    pub fn new(params: Vec<Tensor>, options: AdamOptions) -> Result<Adam> {
        const OP: &str = "Adam::new";
        check_params(OP, &params)?;
        check_hyper(OP, "lr", options.lr, 0.0..=f32::MAX)?;
        check_hyper(OP, "beta1", options.betas.0, 0.0..=0.999_999_9)?;
        check_hyper(OP, "beta2", options.betas.1, 0.0..=0.999_999_9)?;
        check_hyper(OP, "eps", options.eps, 0.0..=f32::MAX)?;
        check_hyper(OP, "weight_decay", options.weight_decay, 0.0..=f32::MAX)?;
        let n = params.len();
        Ok(Adam {
            params,
            moments: vec![None; n],
            step_counts: vec![0; n],
            options,
            steps: 0,
        })
    }

    /// AdamW: Adam with decoupled weight decay (`options.decoupled_weight_decay` is set
    /// whatever it was). The weight decay is `options.weight_decay`: start from
    /// [`AdamOptions::adamw`] for `torch.optim.AdamW`'s default of 0.01.
    ///
    /// ```
    /// use kiln::optim::{Adam, AdamOptions, Optimizer};
    /// let d = kiln::Device::default_device()?;
    /// let w = kiln::Tensor::ones(&[3], &d)?.requires_grad();
    /// let mut opt = Adam::adamw(vec![w.clone()], AdamOptions { lr: 0.1, ..AdamOptions::adamw() })?;
    /// w.set_grad(Some(kiln::Tensor::zeros(&[3], &d)?))?;
    /// opt.step()?;
    /// // A zero gradient leaves only the decay: w * (1 - lr * weight_decay).
    /// assert!((w.to_vec()?[0] - 0.999).abs() < 1e-6);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn adamw(params: Vec<Tensor>, options: AdamOptions) -> Result<Adam> {
        Adam::new(
            params,
            AdamOptions {
                decoupled_weight_decay: true,
                ..options
            },
        )
    }
}

impl Optimizer for Adam {
    fn step(&mut self) -> Result<()> {
        let o = self.options;
        for ((param, moments), count) in self
            .params
            .iter()
            .zip(self.moments.iter_mut())
            .zip(self.step_counts.iter_mut())
        {
            let Some(grad) = param.grad() else { continue };
            if moments.is_none() {
                *moments = Some((param.zeros_like()?.detach(), param.zeros_like()?.detach()));
            }
            *count += 1;
            let t = *count as f64;
            let mut flags = 0;
            if o.decoupled_weight_decay {
                flags |= FLAG_DECOUPLED;
            }
            if o.maximize {
                flags |= FLAG_MAXIMIZE;
            }
            let mut p = base_params(param, &grad, o.lr, flags);
            p.weight_decay = o.weight_decay;
            p.beta1 = o.betas.0;
            p.beta2 = o.betas.1;
            p.eps = o.eps;
            p.bias_correction1 = (1.0 - (o.betas.0 as f64).powf(t)) as f32;
            p.bias_correction2_sqrt = (1.0 - (o.betas.1 as f64).powf(t)).sqrt() as f32;
            if let Some((m, v)) = moments {
                launch(Kernel::AdamStep, param, &grad, &[m, v], p);
            }
        }
        self.steps += 1;
        Ok(())
    }

    fn params(&self) -> &[Tensor] {
        &self.params
    }

    fn lr(&self) -> f32 {
        self.options.lr
    }

    fn set_lr(&mut self, lr: f32) {
        self.options.lr = lr;
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, m) in self.moments.iter().enumerate() {
            if let Some((m, v)) = m {
                out.push((format!("{i}.exp_avg"), m.clone()));
                out.push((format!("{i}.exp_avg_sq"), v.clone()));
                if let Ok(step) = Tensor::scalar(self.step_counts[i] as f32, m.device()) {
                    out.push((format!("{i}.step"), step));
                }
            }
        }
        out
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    fn check_state(&self, name: &str, value: &Tensor) -> Result<()> {
        const OP: &str = "Adam::set_state";
        let scalar = name.ends_with(".step");
        match state_slot(OP, &self.params, name, value, scalar)?.1 {
            "step" => {
                let v = value.to_scalar()?;
                if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 9.2e18 {
                    Ok(())
                } else {
                    Err(Error::invalid(
                        OP,
                        format!("step count {name} must be a whole number >= 0, got {v}"),
                    ))
                }
            }
            "exp_avg" | "exp_avg_sq" => Ok(()),
            kind => Err(Error::invalid(
                OP,
                format!("unknown state {kind} in {name}"),
            )),
        }
    }

    fn set_state(&mut self, name: &str, value: &Tensor) -> Result<()> {
        const OP: &str = "Adam::set_state";
        self.check_state(name, value)?;
        let scalar = name.ends_with(".step");
        let (i, kind) = state_slot(OP, &self.params, name, value, scalar)?;
        if kind == "step" {
            self.step_counts[i] = value.to_scalar()? as u64;
            return Ok(());
        }
        let param = &self.params[i];
        let (m, v) = match self.moments[i].take() {
            Some(mv) => mv,
            None => (param.zeros_like()?, param.zeros_like()?),
        };
        self.moments[i] = Some(match kind {
            "exp_avg" => (owned_copy(value)?, v),
            "exp_avg_sq" => (m, owned_copy(value)?),
            _ => {
                self.moments[i] = Some((m, v));
                return Err(Error::invalid(
                    OP,
                    format!("unknown state {kind} in {name}"),
                ));
            }
        });
        Ok(())
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping as a one-element
/// tensor. Runs on the GPU without reading anything back.
///
/// ```
/// # let dev = kiln::Device::default_device()?;
/// let w = kiln::Tensor::from_slice(&[3.0, 4.0], &[2], &dev)?.requires_grad();
/// w.mul_scalar(1.0)?.mul(&w)?.sum_all()?.backward()?; // gradient (6, 8), norm 10
/// let norm = kiln::optim::clip_grad_norm(&[w.clone()], 5.0)?;
/// assert_eq!(norm.to_scalar()?, 10.0);
/// let g = w.grad().unwrap().to_vec()?;
/// assert!((g[0] - 3.0).abs() < 1e-4 && (g[1] - 4.0).abs() < 1e-4);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn clip_grad_norm(params: &[Tensor], max_norm: f32) -> Result<Tensor> {
    const OP: &str = "clip_grad_norm";
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::invalid(
            OP,
            format!("max_norm must be >= 0, got {max_norm}"),
        ));
    }
    let grads: Vec<(&Tensor, Tensor)> = params
        .iter()
        .filter_map(|p| p.grad().map(|g| (p, g)))
        .collect();
    if grads.is_empty() {
        return Err(Error::invalid(OP, "no parameter has a gradient"));
    }
    no_grad(|| {
        let mut squares = Vec::with_capacity(grads.len());
        for (_, g) in &grads {
            squares.push(g.mul(g)?.sum_all()?.reshape(&[1])?);
        }
        let refs: Vec<&Tensor> = squares.iter().collect();
        let total = Tensor::concat(&refs, 0)?.sum_all()?.sqrt()?;
        // clip = min(max_norm / (norm + 1e-6), 1)
        let clip = total
            .add_scalar(1e-6)?
            .rdiv_scalar(max_norm)?
            .minimum_scalar(1.0)?;
        for (p, g) in &grads {
            p.set_grad(Some(g.mul(&clip)?))?;
        }
        Ok(total)
    })
}
