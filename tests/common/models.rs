//! The models the capture and ONNX tests share: the digits CNN, a ResNet-style net and a
//! pre-LN transformer block, with seeded weights and inputs.

use super::Rng;
use kiln::nn::{BatchNorm, Conv2d, Embedding, Init, LayerNorm, Linear, Module, TensorRole};
use kiln::{Conv2dOptions, Device, Result, Tensor};

/// The digits CNN of the capture tests (input (N, 1, 8, 8)).
pub const DIGITS_CNN: &str = "conv2d(1,16,3,p=1) batchnorm2d(16) relu conv2d(16,32,3,p=1) relu \
                              maxpool2d(2) flatten linear(512,64) relu dropout(0.2) linear(64,10)";

/// Random running statistics and affine parameters, so that folding has work to do.
pub fn randomize_bn(bn: &BatchNorm, seed: u64) {
    let c = bn.running_mean.numel();
    let d = bn.running_mean.device().clone();
    let mut rng = Rng::new(seed);
    bn.running_mean
        .assign(&Tensor::from_slice(&rng.vec(c, -0.5, 0.5), &[c], &d).unwrap())
        .unwrap();
    bn.running_var
        .assign(&Tensor::from_slice(&rng.vec(c, 0.5, 2.0), &[c], &d).unwrap())
        .unwrap();
    // Scales near 1 and small shifts keep each sample's signal through the network.
    for (t, lo, hi) in [(&bn.weight, 0.5, 1.5), (&bn.bias, -0.3, 0.3)] {
        if let Some(t) = t {
            t.assign(&Tensor::from_slice(&rng.vec(c, lo, hi), &[c], &d).unwrap())
                .unwrap();
        }
    }
}

pub fn conv(
    init: &mut Init,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Conv2d {
    let opts = Conv2dOptions {
        stride: [stride, stride],
        padding: [pad, pad],
        ..Default::default()
    };
    Conv2d::new(init, cin, cout, [k, k], opts, false).unwrap()
}

/// A residual block: conv-bn-relu-conv-bn plus the input (or a 1x1 stride-2 conv-bn
/// shortcut), then relu.
pub struct ResBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    shortcut: Option<(Conv2d, BatchNorm)>,
}

impl ResBlock {
    fn new(init: &mut Init, cin: usize, cout: usize, stride: usize, seed: u64) -> ResBlock {
        let b = ResBlock {
            conv1: conv(init, cin, cout, 3, stride, 1),
            bn1: BatchNorm::new_2d(init, cout).unwrap(),
            conv2: conv(init, cout, cout, 3, 1, 1),
            bn2: BatchNorm::new_2d(init, cout).unwrap(),
            shortcut: (stride != 1 || cin != cout).then(|| {
                (
                    conv(init, cin, cout, 1, stride, 0),
                    BatchNorm::new_2d(init, cout).unwrap(),
                )
            }),
        };
        randomize_bn(&b.bn1, seed);
        randomize_bn(&b.bn2, seed + 1);
        if let Some((_, bn)) = &b.shortcut {
            randomize_bn(bn, seed + 2);
        }
        b
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.bn1.forward(&self.conv1.forward(x)?)?.relu()?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?)?;
        let s = match &self.shortcut {
            Some((c, bn)) => bn.forward(&c.forward(x)?)?,
            None => x.clone(),
        };
        h.add(&s)?.relu()
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        self.conv2.visit(f);
        self.bn2.visit(f);
        if let Some((c, bn)) = &self.shortcut {
            c.visit(f);
            bn.visit(f);
        }
    }

    fn set_training(&mut self, training: bool) {
        self.bn1.set_training(training);
        self.bn2.set_training(training);
        if let Some((_, bn)) = &mut self.shortcut {
            bn.set_training(training);
        }
    }

    fn describe(&self) -> String {
        "ResBlock".into()
    }
}

/// stem conv-bn-relu, two blocks at 8 channels, one down to 16 with a 1x1 stride-2
/// shortcut, global average pooling, linear head.
pub struct ResNet {
    stem: Conv2d,
    bn: BatchNorm,
    blocks: Vec<ResBlock>,
    head: Linear,
}

pub fn resnet(d: &Device) -> ResNet {
    let mut init = Init::new(d, 11);
    let stem = conv(&mut init, 1, 8, 3, 1, 1);
    let bn = BatchNorm::new_2d(&mut init, 8).unwrap();
    randomize_bn(&bn, 100);
    let blocks = vec![
        ResBlock::new(&mut init, 8, 8, 1, 200),
        ResBlock::new(&mut init, 8, 8, 1, 300),
        ResBlock::new(&mut init, 8, 16, 2, 400),
    ];
    let head = Linear::new(&mut init, 16, 10, true).unwrap();
    ResNet {
        stem,
        bn,
        blocks,
        head,
    }
}

impl Module for ResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.bn.forward(&self.stem.forward(x)?)?.relu()?;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        self.head
            .forward(&h.adaptive_avg_pool2d([1, 1])?.flatten(1, -1)?)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        self.stem.visit(f);
        self.bn.visit(f);
        for b in &self.blocks {
            b.visit(f);
        }
        self.head.visit(f);
    }

    fn set_training(&mut self, training: bool) {
        self.bn.set_training(training);
        for b in &mut self.blocks {
            b.set_training(training);
        }
    }

    fn describe(&self) -> String {
        "ResNet".into()
    }
}

/// A pre-LN transformer encoder block over token ids: embedding, causal multi-head attention
/// from matmul and softmax with the mask applied by `where_cond`, layer norms, a GELU MLP and
/// residuals.
pub struct Block {
    emb: Embedding,
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

pub const T: usize = 5;
pub const DIM: usize = 8;

pub fn block(d: &Device) -> Block {
    let mut init = Init::new(d, 21);
    let i = &mut init;
    Block {
        emb: Embedding::new(i, 13, DIM).unwrap(),
        ln1: LayerNorm::new(i, &[DIM]).unwrap(),
        q: Linear::new(i, DIM, DIM, true).unwrap(),
        k: Linear::new(i, DIM, DIM, true).unwrap(),
        v: Linear::new(i, DIM, DIM, true).unwrap(),
        o: Linear::new(i, DIM, DIM, true).unwrap(),
        ln2: LayerNorm::new(i, &[DIM]).unwrap(),
        fc1: Linear::new(i, DIM, 2 * DIM, true).unwrap(),
        fc2: Linear::new(i, 2 * DIM, DIM, true).unwrap(),
        heads: 2,
    }
}

/// 1 where position j may attend to position i (j <= i), as a (T, T) tensor.
pub fn causal_mask(d: &Device) -> Tensor {
    let m: Vec<f32> = (0..T * T)
        .map(|p| ((p % T) <= (p / T)) as u8 as f32)
        .collect();
    Tensor::from_slice(&m, &[T, T], d).unwrap()
}

impl Block {
    pub fn run(&self, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (n, t) = (tokens.dims()[0] as isize, tokens.dims()[1] as isize);
        let (h, dh) = (self.heads as isize, (DIM / self.heads) as isize);
        let x = self.emb.forward(tokens)?;
        let a = self.ln1.forward(&x)?;
        let split = |y: Tensor| y.reshape(&[n, t, h, dh])?.permute(&[0, 2, 1, 3]);
        let (q, k, v) = (
            split(self.q.forward(&a)?)?,
            split(self.k.forward(&a)?)?,
            split(self.v.forward(&a)?)?,
        );
        let scores = q
            .matmul(&k.transpose(-2, -1)?)?
            .mul_scalar(1.0 / (dh as f32).sqrt())?;
        let neg = Tensor::full(&[1], -1e9, tokens.device())?;
        let p = mask.where_cond(&scores, &neg)?.softmax(-1)?;
        let att = p
            .matmul(&v)?
            .permute(&[0, 2, 1, 3])?
            .reshape(&[n, t, DIM as isize])?;
        let x = x.add(&self.o.forward(&att)?)?;
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.ln2.forward(&x)?)?.gelu()?)?;
        x.add(&m)
    }
}

impl Module for Block {
    fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        self.run(tokens, &causal_mask(tokens.device()))
    }

    fn describe(&self) -> String {
        "Block".into()
    }
}

pub fn tokens(n: usize, seed: u64, d: &Device) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..n * T).map(|_| rng.below(13) as f32).collect();
    Tensor::from_slice(&v, &[n, T], d).unwrap()
}

pub fn images(n: usize, seed: u64, d: &Device) -> Tensor {
    Tensor::randn(&[n, 1, 8, 8], seed, d).unwrap()
}

/// A module touching every op ONNX export writes: pools of each kind, a transposed conv
/// with group norm and SiLU, activations, reductions, comparisons with where, index_select,
/// gather, expand and narrow, concatenated into one (N, K) output. Input (N, 4, 6, 6).
pub struct Zoo {
    up_w: Tensor,
    up_b: Tensor,
    gn_w: Tensor,
    gn_b: Tensor,
    shift: Tensor,
    pick: Tensor,
    gather: Tensor,
}

pub fn zoo(d: &Device) -> Zoo {
    let r = |s: &[usize], seed| Tensor::randn(s, seed, d).unwrap();
    Zoo {
        up_w: r(&[4, 6, 3, 3], 1).mul_scalar(0.3).unwrap(),
        up_b: r(&[6], 2),
        gn_w: r(&[6], 3),
        gn_b: r(&[6], 4),
        shift: r(&[1, 144], 5),
        pick: Tensor::from_slice(&[3.0, 0.0, 7.0, 143.0], &[4], d).unwrap(),
        gather: Tensor::from_slice(&[5.0, 1.0, 140.0], &[1, 3], d).unwrap(),
    }
}

impl Module for Zoo {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use kiln::{ConvTranspose2dOptions, Pool2dOptions};
        let n = x.dims()[0];
        let mut parts: Vec<Tensor> = Vec::new();
        let max = Pool2dOptions {
            stride: [2, 2],
            padding: [1, 1],
            ..Pool2dOptions::new([3, 3])
        };
        parts.push(x.max_pool2d(&max)?);
        let dilated = Pool2dOptions {
            stride: [1, 1],
            dilation: [2, 2],
            ..Pool2dOptions::new([2, 2])
        };
        parts.push(x.max_pool2d(&dilated)?);
        let avg = Pool2dOptions {
            padding: [1, 1],
            count_include_pad: false,
            ..Pool2dOptions::new([2, 2])
        };
        parts.push(x.avg_pool2d(&avg)?);
        parts.push(x.adaptive_avg_pool2d([2, 3])?);
        let up = ConvTranspose2dOptions {
            stride: [2, 2],
            padding: [1, 1],
            output_padding: [1, 1],
            ..Default::default()
        };
        let u = x
            .conv_transpose2d(&self.up_w, Some(&self.up_b), &up)?
            .group_norm(3, Some(&self.gn_w), Some(&self.gn_b), 1e-5)?
            .silu()?;
        parts.push(u.adaptive_avg_pool2d([1, 1])?);
        let v = x.flatten(1, -1)?.add(&self.shift)?;
        let a = v.abs()?;
        for y in [
            v.softmax(-1)?,
            v.log_softmax(-1)?,
            v.var(&[-1], true, 1)?,
            v.max(&[-1], true)?,
            v.min(&[1], true)?,
            v.mean(&[-1], true)?,
            v.sum(&[-1], true)?,
            v.argmax(-1, true)?,
            v.clamp(-0.5, 0.5)?,
            v.leaky_relu(0.1)?,
            v.softplus(2.0, 5.0)?,
            v.gelu_tanh()?,
            v.gelu()?,
            v.erf()?,
            a.log1p()?,
            a.add_scalar(1.0)?.rsqrt()?,
            a.neg()?.exp()?,
            v.sin()?,
            v.cos()?,
            v.tanh()?,
            v.sigmoid()?,
            v.pow_scalar(2.0)?,
            v.rdiv_scalar(1.0)?.clamp(-3.0, 3.0)?,
            v.gt_scalar(0.2)?.where_cond(&v, &v.mul_scalar(0.5)?)?,
            v.ne_scalar(0.0)?,
            v.le(&self.shift)?,
            v.maximum(&self.shift)?.minimum(&a)?,
            v.index_select(1, &self.pick)?,
            v.gather(1, &self.gather.expand(&[n, 3])?)?,
            v.narrow(1, 10, 20)?.sub(&v.narrow(1, 100, 20)?)?,
        ] {
            parts.push(y);
        }
        let flat: Vec<Tensor> = parts
            .iter()
            .map(|p| p.flatten(1, -1))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = flat.iter().collect();
        Tensor::concat(&refs, 1)
    }

    fn describe(&self) -> String {
        "Zoo".into()
    }
}

pub fn zoo_input(n: usize, seed: u64, d: &Device) -> Tensor {
    Tensor::randn(&[n, 4, 6, 6], seed, d).unwrap()
}
