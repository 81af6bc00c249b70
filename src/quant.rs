//! Int8 quantization semantics, as ONNX Runtime's QDQ convention: `val = scale * (q -
//! zero_point)`; quantizing divides by the scale in f32, rounds half to even, adds the zero
//! point and saturates. Weights are symmetric per output channel (`[-127, 127]`, zero point
//! 0); activations asymmetric per tensor (`[-128, 127]`), their range widened to include 0.
//!
//! ```
//! use kiln::quant::QParams;
//! let q = QParams::asymmetric(-1.0, 3.0)?;
//! assert_eq!(q.quantize(0.0), q.zero_point as i8);     // 0 is exact
//! assert!((q.dequantize(q.quantize(1.234)) - 1.234).abs() <= q.scale / 2.0);
//! assert_eq!(q.quantize(100.0), 127);                  // saturates
//! # Ok::<(), kiln::Error>(())
//! ```

use crate::error::{Error, Result};

/// Scale and zero point of an int8 quantization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    /// The real value of one quantization step.
    pub scale: f32,
    /// The quantized value of 0.
    pub zero_point: i32,
}

/// The range of asymmetric int8 values.
pub const QMIN: i32 = -128;
/// The largest int8 value.
pub const QMAX: i32 = 127;

impl QParams {
    /// Asymmetric int8 over `[min, max]` (widened to include 0), as ONNX Runtime's
    /// `compute_scale_zp`: scale `(max - min) / 255` in f64 then stored as f32, zero point
    /// `round(-128 - min / scale)` (half to even). A range of zero gives scale 1.
    pub fn asymmetric(min: f32, max: f32) -> Result<QParams> {
        check_range("QParams::asymmetric", min, max)?;
        let (lo, hi) = (min.min(0.0), max.max(0.0));
        let scale = (hi as f64 - lo as f64) / (QMAX - QMIN) as f64;
        if (scale as f32) < f32::MIN_POSITIVE {
            return Ok(QParams {
                scale: 1.0,
                zero_point: 0,
            });
        }
        let zp = (QMIN as f64 - lo as f64 / scale).round_ties_even();
        Ok(QParams {
            scale: scale as f32,
            zero_point: (zp as i32).clamp(QMIN, QMAX),
        })
    }

    /// Symmetric int8 over `[-absmax, absmax]`: scale `absmax / 127`, zero point 0 (weights).
    pub fn symmetric(absmax: f32) -> Result<QParams> {
        check_range("QParams::symmetric", -absmax, absmax)?;
        let scale = absmax.abs() as f64 * 2.0 / 254.0;
        if (scale as f32) < f32::MIN_POSITIVE {
            return Ok(QParams {
                scale: 1.0,
                zero_point: 0,
            });
        }
        Ok(QParams {
            scale: scale as f32,
            zero_point: 0,
        })
    }

    /// `x` quantized: `saturate(round_half_even(x / scale) + zero_point)`.
    pub fn quantize(self, x: f32) -> i8 {
        let q = (x / self.scale).round_ties_even() + self.zero_point as f32;
        // NaN saturates to the zero point's side like ONNX Runtime's cast: 0 after clamp.
        if q.is_nan() {
            return self.zero_point.clamp(QMIN, QMAX) as i8;
        }
        q.clamp(QMIN as f32, QMAX as f32) as i8
    }

    /// The real value of `q`: `scale * (q - zero_point)`.
    pub fn dequantize(self, q: i8) -> f32 {
        self.scale * (q as i32 - self.zero_point) as f32
    }
}

fn check_range(op: &'static str, min: f32, max: f32) -> Result<()> {
    if !min.is_finite() || !max.is_finite() || min > max {
        return Err(Error::invalid(
            op,
            format!("the range [{min}, {max}] must be finite and ordered"),
        ));
    }
    Ok(())
}

/// Per-output-channel symmetric parameters of a weight whose axis 0 is the output channel.
pub fn weight_params(values: &[f32], channels: usize) -> Result<Vec<QParams>> {
    if channels == 0 || !values.len().is_multiple_of(channels) {
        return Err(Error::invalid(
            "quant::weight_params",
            format!(
                "{} values do not split into {channels} channels",
                values.len()
            ),
        ));
    }
    let per = values.len() / channels;
    (0..channels)
        .map(|c| {
            let absmax = values[c * per..(c + 1) * per]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            QParams::symmetric(absmax)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_round_to_even_and_values_saturate() {
        let q = QParams {
            scale: 0.5,
            zero_point: 3,
        };
        // 0.25 / 0.5 = 0.5 -> 0, 0.75 / 0.5 = 1.5 -> 2, -0.25 -> -0.5 -> 0.
        assert_eq!(
            [q.quantize(0.25), q.quantize(0.75), q.quantize(-0.25)],
            [3, 5, 3]
        );
        assert_eq!([q.quantize(1e9), q.quantize(-1e9)], [127, -128]);
        assert_eq!(q.dequantize(5), 1.0);
        assert!(QParams::asymmetric(1.0, 0.0).is_err());
        assert!(QParams::asymmetric(f32::NAN, 1.0).is_err());
        let zero = QParams::asymmetric(0.0, 0.0).unwrap();
        assert_eq!((zero.scale, zero.zero_point), (1.0, 0));
        // A positive range still represents 0 exactly: the zero point is -128.
        assert_eq!(QParams::asymmetric(2.0, 5.0).unwrap().zero_point, -128);
        assert_eq!(QParams::symmetric(1.27).unwrap().scale, 0.01);
    }
}
