//! Learning-rate schedules as closed-form functions of the epoch (or step) count.

/// A learning rate for each epoch (or step, if you call it per step).
///
/// ```
/// use kiln::optim::{CosineAnnealing, LrSchedule};
/// let s = CosineAnnealing { base_lr: 0.1, t_max: 10, eta_min: 0.0 };
/// assert!((s.lr_at(5) - 0.05).abs() < 1e-6);
/// ```
pub trait LrSchedule {
    /// The learning rate at `t` (0 for the first epoch).
    fn lr_at(&self, t: usize) -> f32;
}

/// `base_lr * gamma^(t / step_size)`, as `torch.optim.lr_scheduler.StepLR`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepDecay {
    /// Initial learning rate.
    pub base_lr: f32,
    /// Epochs between decays.
    pub step_size: usize,
    /// Multiplier at each decay (PyTorch's default 0.1).
    pub gamma: f32,
}

impl LrSchedule for StepDecay {
    fn lr_at(&self, t: usize) -> f32 {
        let k = t.checked_div(self.step_size).unwrap_or(0);
        (self.base_lr as f64 * (self.gamma as f64).powi(k as i32)) as f32
    }
}

/// `eta_min + (base_lr - eta_min) (1 + cos(pi t / t_max)) / 2`, as
/// `torch.optim.lr_scheduler.CosineAnnealingLR` (its closed form).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineAnnealing {
    /// Initial learning rate.
    pub base_lr: f32,
    /// Half period, in epochs.
    pub t_max: usize,
    /// Lowest learning rate.
    pub eta_min: f32,
}

impl LrSchedule for CosineAnnealing {
    fn lr_at(&self, t: usize) -> f32 {
        if self.t_max == 0 {
            return self.base_lr;
        }
        let c = (std::f64::consts::PI * t as f64 / self.t_max as f64).cos();
        (self.eta_min as f64 + (self.base_lr - self.eta_min) as f64 * (1.0 + c) / 2.0) as f32
    }
}

/// A linear ramp of the factor from `start_factor` to `end_factor` over `total_iters`, then
/// constant, as `torch.optim.lr_scheduler.LinearLR` (a warm-up with the defaults 1/3 and 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearWarmup {
    /// Learning rate the factors multiply.
    pub base_lr: f32,
    /// Factor at t = 0.
    pub start_factor: f32,
    /// Factor from t = total_iters on.
    pub end_factor: f32,
    /// Length of the ramp.
    pub total_iters: usize,
}

impl LrSchedule for LinearWarmup {
    fn lr_at(&self, t: usize) -> f32 {
        let frac = if self.total_iters == 0 {
            1.0
        } else {
            t.min(self.total_iters) as f64 / self.total_iters as f64
        };
        let factor = self.start_factor as f64 + (self.end_factor - self.start_factor) as f64 * frac;
        (self.base_lr as f64 * factor) as f32
    }
}

/// One schedule for the first `switch_at` steps, then another counted from 0 again, as
/// `torch.optim.lr_scheduler.SequentialLR` with one milestone: a warm-up then a cosine decay.
///
/// ```
/// use kiln::optim::{Chained, CosineAnnealing, LinearWarmup, LrSchedule};
/// let warm = LinearWarmup { base_lr: 0.1, start_factor: 0.1, end_factor: 1.0, total_iters: 10 };
/// let cos = CosineAnnealing { base_lr: 0.1, t_max: 90, eta_min: 0.0 };
/// let s = Chained { first: &warm, switch_at: 10, then: &cos };
/// assert!((s.lr_at(0) - 0.01).abs() < 1e-7);
/// assert!((s.lr_at(10) - 0.1).abs() < 1e-7);
/// assert!((s.lr_at(55) - 0.05).abs() < 1e-6);
/// ```
#[derive(Clone, Copy)]
pub struct Chained<'a> {
    /// The schedule of steps `0..switch_at`.
    pub first: &'a dyn LrSchedule,
    /// The step at which `then` takes over.
    pub switch_at: usize,
    /// The schedule from `switch_at` on, at `t - switch_at`.
    pub then: &'a dyn LrSchedule,
}

impl LrSchedule for Chained<'_> {
    fn lr_at(&self, t: usize) -> f32 {
        if t < self.switch_at {
            self.first.lr_at(t)
        } else {
            self.then.lr_at(t - self.switch_at)
        }
    }
}
