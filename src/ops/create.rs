//! Constructors: from host data, constant fills, ranges, seeded random numbers.

use super::elementwise::{launch, Extra};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::shape::checked_numel;
use crate::tensor::Tensor;

fn filled(
    op: &'static str,
    kernel: Kernel,
    shape: &[usize],
    device: &Device,
    extra: Extra,
) -> Result<Tensor> {
    let out = Tensor::uninit(op, shape, device)?;
    launch(kernel, &[], &out, &out.layout.clone(), extra);
    Ok(out)
}

fn split_seed(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

impl Tensor {
    /// A tensor holding `data` in row-major order.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[2, 2], &dev)?;
    /// assert_eq!(t.to_vec()?, vec![1.0, 2.0, 3.0, 4.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn from_slice(data: &[f32], shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = Tensor::upload_words(
            "from_slice",
            bytemuck::cast_slice(data),
            data.len(),
            shape,
            crate::DType::F32,
            device,
        )?;
        crate::infer::capture::constant(&t);
        Ok(t)
    }

    /// A tensor of `shape` holding `len` 4-byte elements of `dtype` given as `bytes`.
    pub(crate) fn upload_words(
        op: &'static str,
        bytes: &[u8],
        len: usize,
        shape: &[usize],
        dtype: crate::DType,
        device: &Device,
    ) -> Result<Tensor> {
        let numel = checked_numel(shape)
            .ok_or_else(|| Error::shape(op, format!("shape {shape:?} overflows")))?;
        if numel != len {
            return Err(Error::shape(
                op,
                format!("shape {shape:?} needs {numel} elements, got {len}"),
            ));
        }
        let t = Tensor::alloc_typed(op, shape, dtype, device, true)?;
        device.upload(t.buffer(), bytes);
        Ok(t)
    }

    /// Like [`Tensor::from_slice`], taking the vector.
    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::from_slice(&data, shape, device)
    }

    /// A one-element tensor of rank 0.
    pub fn scalar(value: f32, device: &Device) -> Result<Tensor> {
        Self::from_slice(&[value], &[], device)
    }

    /// Every element equal to `value`.
    pub fn full(shape: &[usize], value: f32, device: &Device) -> Result<Tensor> {
        crate::infer::capture::traced(
            &[],
            |o| crate::infer::graph::OpKind::Full {
                shape: o
                    .dims()
                    .iter()
                    .map(|&d| crate::infer::graph::Dim::fixed(d))
                    .collect(),
                value,
            },
            || {
                let extra = Extra {
                    alpha: value,
                    ..Default::default()
                };
                filled("full", Kernel::FillFwd, shape, device, extra)
            },
        )
    }

    /// All zeros.
    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::full(shape, 0.0, device)
    }

    /// All ones.
    pub fn ones(shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::full(shape, 1.0, device)
    }

    /// Zeros of this tensor's shape, on its device.
    pub fn zeros_like(&self) -> Result<Tensor> {
        Self::zeros(self.dims(), self.device())
    }

    /// Ones of this tensor's shape, on its device.
    pub fn ones_like(&self) -> Result<Tensor> {
        Self::ones(self.dims(), self.device())
    }

    /// `start, start + step, ...` up to but excluding `end` (as `torch.arange`).
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// assert_eq!(kiln::Tensor::arange(0.0, 3.0, 1.0, &dev)?.to_vec()?, vec![0.0, 1.0, 2.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn arange(start: f32, end: f32, step: f32, device: &Device) -> Result<Tensor> {
        if step == 0.0
            || !step.is_finite()
            || !start.is_finite()
            || !end.is_finite()
            || (end - start) * step < 0.0
        {
            return Err(Error::invalid(
                "arange",
                format!("no finite range from {start} to {end} with step {step}"),
            ));
        }
        let n = (((end as f64) - (start as f64)) / step as f64)
            .ceil()
            .max(0.0) as usize;
        let extra = Extra {
            alpha: start,
            beta: step,
            ..Default::default()
        };
        let t = filled("arange", Kernel::ArangeFwd, &[n], device, extra)?;
        crate::infer::capture::constant(&t);
        Ok(t)
    }

    /// Uniform random numbers in `[0, 1)`, reproducible from `seed` on any device.
    pub fn rand(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
        Self::uniform(shape, 0.0, 1.0, seed, device)
    }

    /// Uniform random numbers in `[low, high)`, reproducible from `seed`.
    pub fn uniform(
        shape: &[usize],
        low: f32,
        high: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Tensor> {
        if low.is_nan() || high.is_nan() || low > high {
            return Err(Error::invalid(
                "uniform",
                format!("low {low} exceeds high {high}"),
            ));
        }
        let extra = Extra {
            alpha: low,
            beta: high,
            aux: split_seed(seed),
            ..Default::default()
        };
        crate::infer::capture::refuse("rand", "random numbers would be frozen into the graph")?;
        filled("rand", Kernel::RandFwd, shape, device, extra)
    }

    /// Standard normal random numbers, reproducible from `seed`.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let a = kiln::Tensor::randn(&[4, 4], 7, &dev)?;
    /// let b = kiln::Tensor::randn(&[4, 4], 7, &dev)?;
    /// assert_eq!(a.to_vec()?, b.to_vec()?);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn randn(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
        Self::normal(shape, 0.0, 1.0, seed, device)
    }

    /// Normal random numbers with the given mean and standard deviation.
    pub fn normal(
        shape: &[usize],
        mean: f32,
        std: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Tensor> {
        if std.is_nan() || std < 0.0 {
            return Err(Error::invalid(
                "normal",
                format!("std must be >= 0, got {std}"),
            ));
        }
        let extra = Extra {
            alpha: mean,
            beta: std,
            aux: split_seed(seed),
            ..Default::default()
        };
        crate::infer::capture::refuse("randn", "random numbers would be frozen into the graph")?;
        filled("randn", Kernel::RandnFwd, shape, device, extra)
    }
}
