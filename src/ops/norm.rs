//! Normalisation (batch, layer, group) and dropout, composed from kiln's own ops so that their
//! gradients follow from the rules of those ops.

use super::elementwise::{copy_into, launch, Extra};
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::tensor::Tensor;

/// `(x - mean) / sqrt(var + eps)` with biased statistics over `axes` (kept as size 1).
fn standardize(x: &Tensor, axes: &[isize], eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
    let mean = x.mean(axes, true)?;
    let var = x.var(axes, true, 0)?;
    let y = x.sub(&mean)?.mul(&var.add_scalar(eps)?.rsqrt()?)?;
    Ok((y, mean, var))
}

/// `weight` and `bias` of shape (C) broadcast along axis 1 of a rank-`rank` tensor.
fn channel_affine(
    y: Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    c: usize,
    rank: usize,
    op: &'static str,
) -> Result<Tensor> {
    let mut shape = vec![1; rank];
    shape[1] = c;
    let mut y = y;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        let Some(t) = t else { continue };
        if t.dims() != [c] {
            return Err(Error::shape(
                op,
                format!("{name} must have shape [{c}], got {:?}", t.dims()),
            ));
        }
        let t = t.reshape_to(&shape)?;
        y = if name == "weight" {
            y.mul(&t)?
        } else {
            y.add(&t)?
        };
    }
    Ok(y)
}

impl Tensor {
    /// Writes `src`'s values into this tensor's storage, in place (for parameters, optimizer
    /// state and running statistics). Every tensor sharing the storage sees the new values;
    /// nothing is recorded for autograd.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::zeros(&[3], &dev)?;
    /// t.assign(&kiln::Tensor::ones(&[3], &dev)?)?;
    /// assert_eq!(t.to_vec()?, vec![1.0; 3]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        const OP: &str = "assign";
        crate::infer::capture::refuse(OP, "an in-place write during the forward pass")?;
        self.check_device(OP, src)?;
        self.check_float(OP)?;
        src.check_float(OP)?;
        if self.dims() != src.dims() {
            return Err(Error::shape(
                OP,
                format!(
                    "source shape {:?} differs from target shape {:?}",
                    src.dims(),
                    self.dims()
                ),
            ));
        }
        if self
            .layout
            .strides
            .iter()
            .zip(self.dims())
            .any(|(&s, &d)| s == 0 && d > 1)
        {
            return Err(Error::invalid(OP, "cannot write into a broadcast view"));
        }
        copy_into(src, self, &self.layout.clone())?;
        self.bump_version();
        Ok(())
    }

    /// Batch normalisation of an (N, C, ...) input over every axis but 1, as
    /// `torch.nn.functional.batch_norm`. In training, the batch statistics normalise (biased
    /// variance) and the running statistics, when given, are updated in place with `momentum`
    /// (unbiased variance, PyTorch's 0.1 is the usual value); in evaluation the running
    /// statistics normalise.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::randn(&[8, 3, 4, 4], 0, &dev)?;
    /// let (rm, rv) = (kiln::Tensor::zeros(&[3], &dev)?, kiln::Tensor::ones(&[3], &dev)?);
    /// let y = x.batch_norm(Some(&rm), Some(&rv), None, None, true, 0.1, 1e-5)?;
    /// let m = y.mean(&[0, 2, 3], false)?.to_vec()?;
    /// assert!(m.iter().all(|v| v.abs() < 1e-5));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm(
        &self,
        running_mean: Option<&Tensor>,
        running_var: Option<&Tensor>,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        momentum: f32,
        eps: f32,
    ) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[Some(self), running_mean, running_var, weight, bias]
                .into_iter()
                .flatten()
                .collect::<Vec<&Tensor>>(),
            |_| crate::infer::graph::OpKind::BatchNorm {
                eps,
                weight: weight.is_some(),
                bias: bias.is_some(),
            },
            || {
                const OP: &str = "batch_norm";
                if training || running_mean.is_none() || running_var.is_none() {
                    crate::infer::capture::refuse(OP, "batch statistics (training mode or no running statistics); call set_training(false)")?;
                }
                if self.rank() < 2 {
                    return Err(Error::shape(
                        OP,
                        format!("input must be (N, C, ...), got shape {:?}", self.dims()),
                    ));
                }
                let c = self.dims()[1];
                for (name, t) in [("running_mean", running_mean), ("running_var", running_var)] {
                    if let Some(t) = t {
                        self.check_device(OP, t)?;
                        if t.dims() != [c] {
                            return Err(Error::shape(
                                OP,
                                format!("{name} must have shape [{c}], got {:?}", t.dims()),
                            ));
                        }
                    }
                }
                let axes: Vec<isize> = (0..self.rank() as isize).filter(|&a| a != 1).collect();
                let mut stat_shape = vec![1; self.rank()];
                stat_shape[1] = c;
                let y = if training {
                    let count = self.numel() / c.max(1);
                    if count <= 1 {
                        return Err(Error::invalid(
                            OP,
                            format!(
                        "training needs more than one value per channel, got input shape {:?}",
                        self.dims()
                    ),
                        ));
                    }
                    let (y, mean, var) = standardize(self, &axes, eps)?;
                    no_grad(|| -> Result<()> {
                        if let Some(rm) = running_mean {
                            let m = mean.reshape_to(&[c])?;
                            rm.assign(
                                &rm.mul_scalar(1.0 - momentum)?
                                    .add(&m.mul_scalar(momentum)?)?,
                            )?;
                        }
                        if let Some(rv) = running_var {
                            let unbiased = var
                                .reshape_to(&[c])?
                                .mul_scalar(count as f32 / (count - 1) as f32)?;
                            rv.assign(
                                &rv.mul_scalar(1.0 - momentum)?
                                    .add(&unbiased.mul_scalar(momentum)?)?,
                            )?;
                        }
                        Ok(())
                    })?;
                    y
                } else {
                    let (Some(rm), Some(rv)) = (running_mean, running_var) else {
                        return Err(Error::invalid(
                            OP,
                            "evaluation needs running_mean and running_var",
                        ));
                    };
                    let rm = rm.reshape_to(&stat_shape)?;
                    let rv = rv.reshape_to(&stat_shape)?;
                    self.sub(&rm)?.mul(&rv.add_scalar(eps)?.rsqrt()?)?
                };
                channel_affine(y, weight, bias, c, self.rank(), OP)
            },
        )
    }

    /// Layer normalisation over the trailing axes `normalized_shape`, with optional
    /// elementwise `weight` and `bias` of that shape, as `torch.nn.functional.layer_norm`.
    pub fn layer_norm(
        &self,
        normalized_shape: &[usize],
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[Some(self), weight, bias]
                .into_iter()
                .flatten()
                .collect::<Vec<&Tensor>>(),
            |_| crate::infer::graph::OpKind::LayerNorm {
                shape: normalized_shape.to_vec(),
                eps,
                weight: weight.is_some(),
                bias: bias.is_some(),
            },
            || {
                const OP: &str = "layer_norm";
                let k = normalized_shape.len();
                if k == 0 || k > self.rank() || self.dims()[self.rank() - k..] != *normalized_shape
                {
                    return Err(Error::shape(
                        OP,
                        format!(
                    "normalized_shape {normalized_shape:?} must be the trailing axes of {:?}",
                    self.dims()
                ),
                    ));
                }
                let axes: Vec<isize> = (self.rank() - k..self.rank()).map(|a| a as isize).collect();
                let (mut y, _, _) = standardize(self, &axes, eps)?;
                for (name, t) in [("weight", weight), ("bias", bias)] {
                    let Some(t) = t else { continue };
                    if t.dims() != normalized_shape {
                        return Err(Error::shape(
                            OP,
                            format!(
                                "{name} must have shape {normalized_shape:?}, got {:?}",
                                t.dims()
                            ),
                        ));
                    }
                    y = if name == "weight" {
                        y.mul(t)?
                    } else {
                        y.add(t)?
                    };
                }
                Ok(y)
            },
        )
    }

    /// Group normalisation of an (N, C, ...) input: channels split into `groups`, each
    /// normalised over its channels and positions, then a per-channel affine, as
    /// `torch.nn.functional.group_norm`.
    pub fn group_norm(
        &self,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[Some(self), weight, bias]
                .into_iter()
                .flatten()
                .collect::<Vec<&Tensor>>(),
            |_| crate::infer::graph::OpKind::GroupNorm {
                groups,
                eps,
                weight: weight.is_some(),
                bias: bias.is_some(),
            },
            || {
                const OP: &str = "group_norm";
                if self.rank() < 2 {
                    return Err(Error::shape(
                        OP,
                        format!("input must be (N, C, ...), got shape {:?}", self.dims()),
                    ));
                }
                let c = self.dims()[1];
                if groups == 0 || !c.is_multiple_of(groups) {
                    return Err(Error::invalid(
                        OP,
                        format!("{c} channels are not divisible into {groups} groups"),
                    ));
                }
                let n = self.dims()[0] as isize;
                let grouped = self.reshape(&[n, groups as isize, -1])?;
                let (y, _, _) = standardize(&grouped, &[2], eps)?;
                let y = y.reshape_to(self.dims())?;
                channel_affine(y, weight, bias, c, self.rank(), OP)
            },
        )
    }

    /// Dropout: in training, zeroes each element with probability `p` (a mask drawn on the GPU
    /// from `seed`) and scales the rest by 1 / (1 - p); the same mask scales the gradient. The
    /// identity when not training.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::ones(&[1000], &dev)?;
    /// let y = x.dropout(0.5, 42, true)?.to_vec()?;
    /// assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
    /// assert_eq!(x.dropout(0.5, 42, false)?.to_vec()?, vec![1.0; 1000]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn dropout(&self, p: f32, seed: u64, training: bool) -> Result<Tensor> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(
                "dropout",
                format!("probability must be in [0, 1], got {p}"),
            ));
        }
        if !training || p == 0.0 {
            return Ok(self.clone());
        }
        crate::infer::capture::refuse(
            "dropout",
            "dropout in training mode; call set_training(false)",
        )?;
        let mask = Tensor::uninit("dropout", self.dims(), self.device())?;
        let extra = Extra {
            alpha: p,
            beta: if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 },
            aux: [seed as u32, (seed >> 32) as u32],
            ..Default::default()
        };
        launch(
            Kernel::DropoutMaskFwd,
            &[],
            &mask,
            &mask.layout.clone(),
            extra,
        );
        self.mul(&mask)
    }
}
