//! A one-line description of a sequential architecture, a short way to build a
//! [`crate::nn::Sequential`] ([`crate::nn::Sequential::from_spec`]). Frozen inference does not
//! need it: a frozen file holds its own graph.
//!
//! Layers are separated by whitespace; each is `name` or `name(args)` with positional and
//! `key=value` arguments. Layer `i` gets the state-dict prefix `i.`, as in
//! `torch.nn.Sequential`.
//!
//! | layer | arguments |
//! | --- | --- |
//! | `linear` | in, out, `bias=true` |
//! | `conv2d` | in, out, kernel, `s=1`, `p=0`, `d=1`, `g=1`, `bias=true` |
//! | `conv_transpose2d` | in, out, kernel, `s=1`, `p=0`, `op=0`, `d=1`, `g=1`, `bias=true` |
//! | `batchnorm2d`, `batchnorm1d` | channels, `eps=1e-5`, `momentum=0.1` |
//! | `layernorm` | the normalised trailing sizes, `eps=1e-5` |
//! | `maxpool2d`, `avgpool2d` | kernel, `s=kernel`, `p=0` |
//! | `adaptive_avgpool2d` | out_h, out_w |
//! | `flatten` | `start=1`, `end=-1` |
//! | `dropout` | p |
//! | `embedding` | count, dim |
//! | `basicblock` | in, out, `s=1`, `mid=out` (torchvision's ResNet `BasicBlock`, [`crate::nn::Residual`]; `mid` channels between its convolutions) |
//! | `relu`, `gelu`, `tanh`, `sigmoid`, `silu` | |
//! | `leaky_relu` | `slope=0.01` |
//!
//! ```
//! let layers = kiln::spec::parse("conv2d(1,16,3,p=1) relu maxpool2d(2) flatten linear(256,10)")?;
//! assert_eq!(layers.len(), 5);
//! # Ok::<(), kiln::Error>(())
//! ```

use crate::error::{Error, Result};

/// One parsed layer. Fields carry PyTorch's argument names and defaults.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum LayerSpec {
    /// `linear(in, out)`
    Linear {
        in_features: usize,
        out_features: usize,
        bias: bool,
    },
    /// `conv2d(in, out, k)`
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
        bias: bool,
    },
    /// `conv_transpose2d(in, out, k)`
    ConvTranspose2d {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        output_padding: usize,
        dilation: usize,
        groups: usize,
        bias: bool,
    },
    /// `batchnorm2d(c)` (rank 4) or `batchnorm1d(c)`
    BatchNorm {
        channels: usize,
        two_d: bool,
        eps: f32,
        momentum: f32,
    },
    /// `layernorm(d...)`
    LayerNorm { shape: Vec<usize>, eps: f32 },
    /// `maxpool2d(k)` (`max`) or `avgpool2d(k)`
    Pool {
        max: bool,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// `adaptive_avgpool2d(h, w)`
    AdaptiveAvgPool { size: [usize; 2] },
    /// `flatten`
    Flatten { start: isize, end: isize },
    /// `dropout(p)`
    Dropout { p: f32 },
    /// `embedding(n, d)`
    Embedding { count: usize, dim: usize },
    /// `basicblock(in, out)`: a residual block of two 3x3 convolutions.
    BasicBlock {
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        /// Channels between the two convolutions (`out` unless pruned).
        mid: usize,
    },
    /// An activation: `relu`, `gelu`, `tanh`, `sigmoid`, `silu`, `leaky_relu(slope)`.
    Activation { op: crate::UnaryOp, slope: f32 },
}

impl LayerSpec {
    /// The convolution options of a `conv2d` layer.
    pub fn conv2d_options(&self) -> Option<crate::Conv2dOptions> {
        match *self {
            LayerSpec::Conv2d {
                stride,
                padding,
                dilation,
                groups,
                ..
            } => Some(crate::Conv2dOptions {
                stride: [stride; 2],
                padding: [padding; 2],
                dilation: [dilation; 2],
                groups,
            }),
            _ => None,
        }
    }

    /// The options of a `conv_transpose2d` layer.
    pub fn conv_transpose2d_options(&self) -> Option<crate::ConvTranspose2dOptions> {
        match *self {
            LayerSpec::ConvTranspose2d {
                stride,
                padding,
                output_padding,
                dilation,
                groups,
                ..
            } => Some(crate::ConvTranspose2dOptions {
                stride: [stride; 2],
                padding: [padding; 2],
                output_padding: [output_padding; 2],
                dilation: [dilation; 2],
                groups,
            }),
            _ => None,
        }
    }

    /// The window options of a `maxpool2d` or `avgpool2d` layer.
    pub fn pool_options(&self) -> Option<crate::Pool2dOptions> {
        match *self {
            LayerSpec::Pool {
                kernel,
                stride,
                padding,
                ..
            } => {
                let mut o = crate::Pool2dOptions::new([kernel; 2]);
                o.stride = [stride; 2];
                o.padding = [padding; 2];
                Some(o)
            }
            _ => None,
        }
    }
}

struct Args<'a> {
    token: &'a str,
    positional: Vec<&'a str>,
    named: Vec<(&'a str, &'a str)>,
    used: usize,
}

fn bad(token: &str, msg: impl std::fmt::Display) -> Error {
    Error::invalid("spec", format!("`{token}`: {msg}"))
}

impl<'a> Args<'a> {
    fn get<T: std::str::FromStr>(
        &mut self,
        index: usize,
        key: &str,
        default: Option<T>,
    ) -> Result<T> {
        let raw = self
            .named
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .or_else(|| self.positional.get(index).copied());
        match raw {
            Some(v) => {
                self.used += 1;
                v.parse()
                    .map_err(|_| bad(self.token, format!("cannot read {key} = {v}")))
            }
            None => default.ok_or_else(|| bad(self.token, format!("missing argument {key}"))),
        }
    }

    fn finish(&self) -> Result<()> {
        if self.used < self.positional.len() + self.named.len() {
            return Err(bad(self.token, "unexpected arguments"));
        }
        Ok(())
    }
}

pub(crate) fn tokens(spec: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = None;
    for (i, c) in spec.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            c if c.is_whitespace() && depth == 0 => {
                if let Some(s) = start.take() {
                    out.push(&spec[s..i]);
                }
                continue;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(Error::invalid(
                "spec",
                format!("unbalanced ')' at byte {i}"),
            ));
        }
        if start.is_none() {
            start = Some(i);
        }
    }
    if depth != 0 {
        return Err(Error::invalid("spec", "unbalanced '('"));
    }
    if let Some(s) = start {
        out.push(&spec[s..]);
    }
    Ok(out)
}

/// Parses a whole architecture.
pub fn parse(spec: &str) -> Result<Vec<LayerSpec>> {
    tokens(spec)?.into_iter().map(parse_layer).collect()
}

fn parse_layer(token: &str) -> Result<LayerSpec> {
    use crate::UnaryOp as U;
    let (name, inner) = match token.find('(') {
        Some(i) if token.ends_with(')') => (&token[..i], &token[i + 1..token.len() - 1]),
        Some(_) => return Err(bad(token, "expected name(args)")),
        None => (token, ""),
    };
    let mut a = Args {
        token,
        positional: Vec::new(),
        named: Vec::new(),
        used: 0,
    };
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => a.named.push((k.trim(), v.trim())),
            None => a.positional.push(part),
        }
    }
    let layer = match name {
        "linear" => LayerSpec::Linear {
            in_features: a.get(0, "in", None)?,
            out_features: a.get(1, "out", None)?,
            bias: a.get(2, "bias", Some(true))?,
        },
        "conv2d" => LayerSpec::Conv2d {
            in_channels: a.get(0, "in", None)?,
            out_channels: a.get(1, "out", None)?,
            kernel: a.get(2, "k", None)?,
            stride: a.get(3, "s", Some(1))?,
            padding: a.get(4, "p", Some(0))?,
            dilation: a.get(5, "d", Some(1))?,
            groups: a.get(6, "g", Some(1))?,
            bias: a.get(7, "bias", Some(true))?,
        },
        "conv_transpose2d" => LayerSpec::ConvTranspose2d {
            in_channels: a.get(0, "in", None)?,
            out_channels: a.get(1, "out", None)?,
            kernel: a.get(2, "k", None)?,
            stride: a.get(3, "s", Some(1))?,
            padding: a.get(4, "p", Some(0))?,
            output_padding: a.get(5, "op", Some(0))?,
            dilation: a.get(6, "d", Some(1))?,
            groups: a.get(7, "g", Some(1))?,
            bias: a.get(8, "bias", Some(true))?,
        },
        "batchnorm2d" | "batchnorm1d" => LayerSpec::BatchNorm {
            channels: a.get(0, "c", None)?,
            two_d: name == "batchnorm2d",
            eps: a.get(1, "eps", Some(1e-5))?,
            momentum: a.get(2, "momentum", Some(0.1))?,
        },
        "layernorm" => {
            let eps = a.get(usize::MAX, "eps", Some(1e-5))?;
            let shape = a
                .positional
                .iter()
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(token, format!("cannot read size {v}")))
                })
                .collect::<Result<Vec<usize>>>()?;
            if shape.is_empty() {
                return Err(bad(token, "missing the normalised sizes"));
            }
            a.used += shape.len();
            LayerSpec::LayerNorm { shape, eps }
        }
        "maxpool2d" | "avgpool2d" => {
            let kernel = a.get(0, "k", None)?;
            LayerSpec::Pool {
                max: name == "maxpool2d",
                kernel,
                stride: a.get(1, "s", Some(kernel))?,
                padding: a.get(2, "p", Some(0))?,
            }
        }
        "adaptive_avgpool2d" => LayerSpec::AdaptiveAvgPool {
            size: [a.get(0, "h", None)?, a.get(1, "w", None)?],
        },
        "flatten" => LayerSpec::Flatten {
            start: a.get(0, "start", Some(1))?,
            end: a.get(1, "end", Some(-1))?,
        },
        "dropout" => LayerSpec::Dropout {
            p: a.get(0, "p", None)?,
        },
        "embedding" => LayerSpec::Embedding {
            count: a.get(0, "n", None)?,
            dim: a.get(1, "dim", None)?,
        },
        "basicblock" => {
            let out_channels = a.get(1, "out", None)?;
            LayerSpec::BasicBlock {
                in_channels: a.get(0, "in", None)?,
                out_channels,
                stride: a.get(2, "s", Some(1))?,
                mid: a.get(3, "mid", Some(out_channels))?,
            }
        }
        "relu" => LayerSpec::Activation {
            op: U::Relu,
            slope: 0.0,
        },
        "gelu" => LayerSpec::Activation {
            op: U::Gelu,
            slope: 0.0,
        },
        "tanh" => LayerSpec::Activation {
            op: U::Tanh,
            slope: 0.0,
        },
        "sigmoid" => LayerSpec::Activation {
            op: U::Sigmoid,
            slope: 0.0,
        },
        "silu" => LayerSpec::Activation {
            op: U::Silu,
            slope: 0.0,
        },
        "leaky_relu" => LayerSpec::Activation {
            op: U::LeakyRelu,
            slope: a.get(0, "slope", Some(0.01))?,
        },
        other => return Err(bad(token, format!("unknown layer {other}"))),
    };
    a.finish()?;
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layers_and_rejects_mistakes() {
        let l = parse("conv2d(1, 16, 3, p=1)  relu\nmaxpool2d(2) flatten linear(512,64,bias=false) layernorm(4,5) leaky_relu(0.2) basicblock(4,8,s=2)").unwrap();
        assert_eq!(l.len(), 8);
        assert_eq!(
            l[7],
            LayerSpec::BasicBlock {
                in_channels: 4,
                out_channels: 8,
                stride: 2,
                mid: 8
            }
        );
        assert!(matches!(
            l[0],
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 16,
                kernel: 3,
                padding: 1,
                stride: 1,
                ..
            }
        ));
        assert!(matches!(
            l[2],
            LayerSpec::Pool {
                max: true,
                kernel: 2,
                stride: 2,
                padding: 0
            }
        ));
        assert!(matches!(l[4], LayerSpec::Linear { bias: false, .. }));
        assert_eq!(
            l[5],
            LayerSpec::LayerNorm {
                shape: vec![4, 5],
                eps: 1e-5
            }
        );
        for bad in [
            "conv2d(1,16)",
            "linear(2,x)",
            "relu(3)",
            "pool(2)",
            "linear(1,2",
            "linear(1,2,3,4)",
            "flatten)",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("nosuch").unwrap_err().to_string().contains("nosuch"));
    }
}
