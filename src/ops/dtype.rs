//! i32 tensors and explicit casts between element types.

use super::elementwise::{launch_variant, Extra, UnaryOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::{Kernel, Variant};
use crate::tensor::{DType, Tensor};

/// The largest magnitude an f32 holds every integer up to: i32 values beyond it do not
/// survive a cast to f32.
pub(crate) const F32_EXACT: i64 = 1 << 24;

impl Tensor {
    /// An i32 tensor of `shape` from the host (indices, class targets).
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let t = kiln::Tensor::from_slice_i32(&[1, -2, i32::MAX], &[3], &dev)?;
    /// assert_eq!(t.to_vec_i32()?, vec![1, -2, i32::MAX]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn from_slice_i32(data: &[i32], shape: &[usize], device: &Device) -> Result<Tensor> {
        const OP: &str = "from_slice_i32";
        crate::infer::capture::refuse(OP, "i32 tensors are not part of frozen graphs yet")?;
        Tensor::upload_words(
            OP,
            bytemuck::cast_slice(data),
            data.len(),
            shape,
            DType::I32,
            device,
        )
    }

    /// The elements of an i32 tensor in row-major order (views included, read exactly).
    pub fn to_vec_i32(&self) -> Result<Vec<i32>> {
        const OP: &str = "to_vec_i32";
        if self.dtype() != DType::I32 {
            return Err(Error::invalid(
                OP,
                format!(
                    "the tensor is {:?}: read it with to_vec, or cast with to_dtype(DType::I32)",
                    self.dtype()
                ),
            ));
        }
        crate::infer::capture::readback(self)?;
        if self.numel() == 0 {
            return Ok(Vec::new());
        }
        // The storage span the view reads, then the view's elements picked on the host (a copy
        // kernel would pass the integers through f32).
        let l = &self.layout;
        let words: Vec<i32> = self.device().read_buffer(
            self.buffer(),
            l.offset as u64 * 4,
            (l.span() - l.offset) as u64 * 4,
        )?;
        Ok((0..self.numel())
            .map(|i| words[l.index_of(i) - l.offset])
            .collect())
    }

    /// The tensor as `dtype`, as `torch.Tensor.to(dtype)`: f32 to i32 truncates toward zero
    /// and saturates at the range (at -2^31 and 2^31 - 128, the largest f32 below 2^31, as
    /// WGSL converts; PyTorch leaves out-of-range values undefined), i32 to f32 rounds to the
    /// nearest f32 (exact up to 2^24). No gradient flows through a cast to i32. The same type returns the tensor.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        const OP: &str = "to_dtype";
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        crate::infer::capture::refuse(OP, "casts are not part of frozen graphs yet")?;
        let variant = match (self.dtype(), dtype) {
            (DType::F32, DType::I32) => Variant::F32ToI32,
            (DType::I32, DType::F32) => Variant::I32ToF32,
            // f16 storage counts halves: the frozen graph's cast handles it (needs SHADER_F16).
            (DType::F32, DType::F16) | (DType::F16, DType::F32) => {
                return crate::no_grad(|| crate::infer::graph::cast(self, dtype));
            }
            (from, to) => {
                return Err(Error::invalid(
                    OP,
                    format!("no cast from {from:?} to {to:?}"),
                ))
            }
        };
        let out = Tensor::alloc_typed(OP, self.dims(), dtype, self.device(), false)?;
        let extra = Extra {
            op: UnaryOp::Identity as u32,
            ..Default::default()
        };
        launch_variant(
            Kernel::UnaryFwd,
            variant,
            &[(self, &self.layout)],
            &out,
            &out.layout,
            extra,
        )?;
        Ok(out)
    }

    /// Index tensors as the index kernels read them: i32 indices are cast to f32 (exactly, for
    /// an axis of at most 2^24 positions); f32 ones are taken as they are.
    pub(crate) fn as_f32_indices(&self, op: &'static str, axis_len: usize) -> Result<Tensor> {
        if self.dtype() != DType::I32 {
            return Ok(self.clone());
        }
        if axis_len as i64 > F32_EXACT {
            return Err(Error::invalid(
                op,
                format!("i32 indices into an axis of {axis_len} positions (at most 2^24)"),
            ));
        }
        crate::no_grad(|| self.to_dtype(DType::F32))
    }
}
