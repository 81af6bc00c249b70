//! # kiln
//!
//! GPU deep learning on [wgpu](https://wgpu.rs): WGSL compute kernels, a [`Tensor`] type,
//! and a runtime that records GPU work lazily and submits it in batches. Runs on any
//! Vulkan, Metal or DX12 adapter, including a software Vulkan driver on machines without a GPU.
//!
//! ```
//! use kiln::{Device, Tensor};
//!
//! let dev = Device::default_device()?;
//! let x = Tensor::randn(&[64, 128], 0, &dev)?;
//! let w = Tensor::randn(&[32, 128], 1, &dev)?.mul_scalar(0.1)?;
//! let logits = x.matmul(&w.t()?)?.relu()?;
//! let probs = logits.softmax(-1)?;
//! let rows = probs.sum(&[-1], false)?.to_vec()?; // the first readback submits the work
//! assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-5));
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! Every fallible function returns [`Result`]; shapes, axes, sizes and devices are checked on
//! the CPU before any GPU work is recorded.

#![warn(missing_docs)]

mod autograd;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod dist;
mod error;
pub mod infer;
pub mod kernels;
pub mod loss;
pub mod nn;
mod ops;
pub mod optim;
pub mod prune;
pub mod quant;
pub mod shape;
pub mod spec;
mod tensor;
pub mod train;

pub use autograd::{is_grad_enabled, no_grad, NoGradGuard};
pub use device::{Device, DeviceOptions, DeviceStats, KernelTime, TuneMode};
pub use error::{Error, Result};
pub use ops::conv::{Conv2dOptions, ConvTranspose2dOptions};
pub use ops::elementwise::{BinaryOp, UnaryOp};
pub use ops::pool::Pool2dOptions;
pub use tensor::{DType, Tensor};
/// The wgpu version kiln is built on, for adapter and limit types in kiln's API.
pub use wgpu;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
