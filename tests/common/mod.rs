//! Shared test helpers: the device, seeded random inputs, an f64 CPU reference, comparisons.
#![allow(dead_code)]

pub mod ddp;
pub mod models;

use kiln::{Device, Tensor};

/// The shared default device. A missing adapter fails the test loudly.
pub fn dev() -> Device {
    Device::default_device().unwrap_or_else(|e| panic!("no GPU adapter for the tests: {e}"))
}

/// A device of its own, for tests that read the runtime counters.
pub fn own_device() -> Device {
    Device::new(&kiln::DeviceOptions::default())
        .unwrap_or_else(|e| panic!("no GPU adapter for the tests: {e}"))
}

/// SplitMix64: small, seeded, good enough for test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A dense row-major f64 array: the CPU oracle.
#[derive(Clone, Debug, PartialEq)]
pub struct Nd {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        if shape[d] > 0 {
            idx[d] = i % shape[d];
            i /= shape[d];
        }
    }
    idx
}

impl Nd {
    pub fn new(shape: &[usize], data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Nd {
            shape: shape.to_vec(),
            data,
        }
    }

    pub fn from_f32(shape: &[usize], data: &[f32]) -> Self {
        Nd::new(shape, data.iter().map(|&v| v as f64).collect())
    }

    pub fn at(&self, idx: &[usize]) -> f64 {
        let s = strides(&self.shape);
        self.data[idx.iter().zip(&s).map(|(i, s)| i * s).sum::<usize>()]
    }

    pub fn map(&self, f: impl Fn(f64) -> f64) -> Nd {
        Nd::new(&self.shape, self.data.iter().map(|&v| f(v)).collect())
    }

    /// Value at `idx` of the broadcast result shape (NumPy rules).
    fn at_broadcast(&self, idx: &[usize]) -> f64 {
        let lead = idx.len() - self.shape.len();
        let own: Vec<usize> = self
            .shape
            .iter()
            .enumerate()
            .map(|(d, &n)| if n == 1 { 0 } else { idx[lead + d] })
            .collect();
        self.at(&own)
    }

    pub fn zip(&self, other: &Nd, f: impl Fn(f64, f64) -> f64) -> Nd {
        let rank = self.shape.len().max(other.shape.len());
        let pad = |s: &[usize]| -> Vec<usize> {
            std::iter::repeat_n(1, rank - s.len())
                .chain(s.iter().copied())
                .collect()
        };
        let (a, b) = (pad(&self.shape), pad(&other.shape));
        let shape: Vec<usize> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| if x == 1 { y } else { x })
            .collect();
        let n = shape.iter().product();
        let data = (0..n)
            .map(|i| {
                let idx = unravel(i, &shape);
                f(self.at_broadcast(&idx), other.at_broadcast(&idx))
            })
            .collect();
        Nd::new(&shape, data)
    }

    pub fn permute(&self, perm: &[usize]) -> Nd {
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let n = self.data.len();
        let data = (0..n)
            .map(|i| {
                let idx = unravel(i, &shape);
                let mut src = vec![0; perm.len()];
                for (d, &p) in perm.iter().enumerate() {
                    src[p] = idx[d];
                }
                self.at(&src)
            })
            .collect();
        Nd::new(&shape, data)
    }

    /// Reduces `axes` (sorted, unique) with `f` over the collected values; keeps them as size 1.
    pub fn reduce(&self, axes: &[usize], f: impl Fn(&[f64]) -> f64) -> Nd {
        let out_shape: Vec<usize> = self
            .shape
            .iter()
            .enumerate()
            .map(|(d, &n)| if axes.contains(&d) { 1 } else { n })
            .collect();
        let n_out: usize = out_shape.iter().product();
        let red_shape: Vec<usize> = axes.iter().map(|&a| self.shape[a]).collect();
        let n_red: usize = red_shape.iter().product();
        let data = (0..n_out)
            .map(|o| {
                let base = unravel(o, &out_shape);
                let vals: Vec<f64> = (0..n_red)
                    .map(|r| {
                        let ridx = unravel(r, &red_shape);
                        let mut idx = base.clone();
                        for (k, &a) in axes.iter().enumerate() {
                            idx[a] = ridx[k];
                        }
                        self.at(&idx)
                    })
                    .collect();
                f(&vals)
            })
            .collect();
        Nd::new(&out_shape, data)
    }

    /// Batched matmul with broadcasting of the batch axes (both operands rank >= 2).
    pub fn matmul(&self, other: &Nd) -> Nd {
        let (ra, rb) = (self.shape.len(), other.shape.len());
        let (m, k, n) = (self.shape[ra - 2], self.shape[ra - 1], other.shape[rb - 1]);
        assert_eq!(k, other.shape[rb - 2]);
        let ba = Nd::new(
            &self.shape[..ra - 2],
            vec![0.0; self.shape[..ra - 2].iter().product()],
        );
        let bb = Nd::new(
            &other.shape[..rb - 2],
            vec![0.0; other.shape[..rb - 2].iter().product()],
        );
        let batch = ba.zip(&bb, |_, _| 0.0).shape;
        let nb: usize = batch.iter().product();
        let mut data = Vec::with_capacity(nb * m * n);
        for z in 0..nb {
            let bidx = unravel(z, &batch);
            let pick = |t: &Nd, r: usize| -> Vec<usize> {
                let lead = batch.len() - (r - 2);
                (0..r - 2)
                    .map(|d| if t.shape[d] == 1 { 0 } else { bidx[lead + d] })
                    .collect()
            };
            let ia = pick(self, ra);
            let ib = pick(other, rb);
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for q in 0..k {
                        let mut x = ia.clone();
                        x.extend([i, q]);
                        let mut y = ib.clone();
                        y.extend([q, j]);
                        acc += self.at(&x) * other.at(&y);
                    }
                    data.push(acc);
                }
            }
        }
        let mut shape = batch;
        shape.extend([m, n]);
        Nd::new(&shape, data)
    }
}

/// A GPU tensor and its f64 twin, from seeded uniform values in [lo, hi).
pub fn rand_pair(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> (Tensor, Nd) {
    let v = rng.vec(shape.iter().product(), lo, hi);
    (
        Tensor::from_slice(&v, shape, &dev()).unwrap(),
        Nd::from_f32(shape, &v),
    )
}

/// Asserts |got - want| <= atol + rtol * |want| elementwise (NaNs must match), and equal shapes.
pub fn assert_close(what: &str, got: &Tensor, want: &Nd, atol: f64, rtol: f64) {
    assert_eq!(got.dims(), &want.shape[..], "{what}: shape");
    let g = got
        .to_vec()
        .unwrap_or_else(|e| panic!("{what}: readback failed: {e}"));
    assert_close_slice(what, &g, &want.data, atol, rtol);
}

pub fn assert_close_slice(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: got {g}, want NaN");
            continue;
        }
        if w.is_infinite() {
            assert_eq!(g, w, "{what}[{i}]: got {g}, want {w}");
            continue;
        }
        let tol = atol + rtol * w.abs();
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tolerance {tol})"
        );
    }
}

// ---- PyTorch fixtures (tests/fixtures/gen_autograd.py) ----

/// One fixture case: inputs, upstream gradient w, PyTorch's output and input gradients.
pub struct Case {
    pub name: String,
    pub inputs: Vec<Nd>,
    pub w: Nd,
    pub out: Nd,
    pub grads: Vec<Option<Nd>>,
    pub extra: Vec<Nd>,
}

pub fn parse_array(fields: &[&str]) -> Nd {
    let shape: Vec<usize> = if fields[0] == "-" {
        vec![]
    } else {
        fields[0]
            .split(',')
            .map(|d| d.parse().expect("dimension"))
            .collect()
    };
    let data: Vec<f64> = fields[1..]
        .iter()
        .map(|v| v.parse().expect("value"))
        .collect();
    Nd::new(&shape, data)
}

pub fn load(text: &str) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let fields: Vec<&str> = line.split(' ').collect();
        match fields[0] {
            "case" => cases.push(Case {
                name: fields[1].to_string(),
                inputs: vec![],
                w: Nd::new(&[], vec![0.0]),
                out: Nd::new(&[], vec![0.0]),
                grads: vec![],
                extra: vec![],
            }),
            tag => {
                let c = cases.last_mut().expect("a case line first");
                match tag {
                    "in" => c.inputs.push(parse_array(&fields[1..])),
                    "w" => c.w = parse_array(&fields[1..]),
                    "out" => c.out = parse_array(&fields[1..]),
                    "grad" if fields[1] == "none" => c.grads.push(None),
                    "grad" => c.grads.push(Some(parse_array(&fields[1..]))),
                    "extra" => c.extra.push(parse_array(&fields[1..])),
                    other => panic!("unknown fixture line {other}"),
                }
            }
        }
    }
    cases
}

/// A GPU tensor holding an f64 array's values.
pub fn tensor(nd: &Nd) -> Tensor {
    let v: Vec<f32> = nd.data.iter().map(|&x| x as f32).collect();
    Tensor::from_slice(&v, &nd.shape, &dev()).unwrap()
}

/// The case's inputs as leaves; those with a PyTorch gradient require grad.
pub fn leaves(c: &Case) -> Vec<Tensor> {
    c.inputs
        .iter()
        .zip(&c.grads)
        .map(|(v, g)| {
            if g.is_some() {
                tensor(v).requires_grad()
            } else {
                tensor(v)
            }
        })
        .collect()
}

/// Backpropagates w through y and compares y and every input gradient with PyTorch's.
pub fn check_case(c: &Case, inputs: &[Tensor], y: &Tensor, atol: f64, rtol: f64) {
    assert_close(&format!("{} output", c.name), y, &c.out, atol, rtol);
    y.backward_with(Some(&tensor(&c.w)), false)
        .unwrap_or_else(|e| panic!("{}: backward: {e}", c.name));
    assert_eq!(
        inputs.len(),
        c.grads.len(),
        "{}: inputs and gradients",
        c.name
    );
    for (i, (t, g)) in inputs.iter().zip(&c.grads).enumerate() {
        match g {
            Some(want) => {
                let got = t
                    .grad()
                    .unwrap_or_else(|| panic!("{}: input {i} got no gradient", c.name));
                assert_close(&format!("{} grad {i}", c.name), &got, want, atol, rtol);
            }
            None => assert!(t.grad().is_none()),
        }
    }
}

// ---- finite differences (see tests/grad_fd.rs for the error analysis) ----

use kiln::Result as KilnResult;

pub const H: f32 = 1e-2;

pub struct Input {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub grad: bool,
}

pub fn input(shape: &[usize], data: Vec<f32>) -> Input {
    Input {
        shape: shape.to_vec(),
        data,
        grad: true,
    }
}

pub fn constant(shape: &[usize], data: Vec<f32>) -> Input {
    Input {
        shape: shape.to_vec(),
        data,
        grad: false,
    }
}

pub fn smooth(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Input {
    input(shape, rng.vec(shape.iter().product(), lo, hi))
}

/// |x| in [0.1, 2): away from the kinks at 0.
pub fn off_zero(rng: &mut Rng, shape: &[usize]) -> Input {
    let n = shape.iter().product();
    input(
        shape,
        (0..n)
            .map(|_| rng.uniform(0.1, 2.0) * if rng.below(2) == 0 { -1.0 } else { 1.0 })
            .collect(),
    )
}

/// Distinct values at least 0.25 apart, shuffled: no ties within 2h.
pub fn spaced(rng: &mut Rng, shape: &[usize]) -> Input {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - n as f32 * 0.125).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i + 1));
    }
    input(shape, v)
}

fn eval(f: &dyn Fn(&[Tensor]) -> KilnResult<Tensor>, inputs: &[Input], w: &[f32]) -> f64 {
    let ts: Vec<Tensor> = inputs
        .iter()
        .map(|i| Tensor::from_slice(&i.data, &i.shape, &dev()).unwrap())
        .collect();
    let y = f(&ts).unwrap().to_vec().unwrap();
    assert_eq!(y.len(), w.len(), "output length");
    y.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
}

pub fn check(name: &str, inputs: Vec<Input>, f: &dyn Fn(&[Tensor]) -> KilnResult<Tensor>) {
    let mut rng = Rng::new(name.bytes().map(u64::from).sum());
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|i| {
            let t = Tensor::from_slice(&i.data, &i.shape, &dev()).unwrap();
            if i.grad {
                t.requires_grad()
            } else {
                t
            }
        })
        .collect();
    let y = f(&leaves).unwrap_or_else(|e| panic!("{name}: {e}"));
    let w = rng.vec(y.numel(), -1.0, 1.0);
    y.backward_with(
        Some(&Tensor::from_slice(&w, y.dims(), &dev()).unwrap()),
        false,
    )
    .unwrap();
    let mut inputs = inputs;
    for k in 0..inputs.len() {
        if !inputs[k].grad {
            continue;
        }
        let grad = leaves[k]
            .grad()
            .unwrap_or_else(|| panic!("{name}: input {k} has no gradient"));
        assert_eq!(
            grad.dims(),
            &inputs[k].shape[..],
            "{name}: gradient {k} shape"
        );
        let analytic = grad.to_vec().unwrap();
        assert_eq!(
            analytic.len(),
            inputs[k].data.len(),
            "{name}: gradient {k} length"
        );
        for (j, &a) in analytic.iter().enumerate() {
            let x0 = inputs[k].data[j];
            inputs[k].data[j] = x0 + H;
            let plus = eval(f, &inputs, &w);
            inputs[k].data[j] = x0 - H;
            let minus = eval(f, &inputs, &w);
            inputs[k].data[j] = x0;
            let numeric = (plus - minus) / (2.0 * H as f64);
            let a = a as f64;
            let tol = 1e-3 + 1e-2 * numeric.abs();
            assert!(
                (a - numeric).abs() <= tol,
                "{name}: d/dx{k}[{j}]: analytic {a}, numeric {numeric}"
            );
        }
    }
}

/// erf in f64 (the Rust standard library has none).
pub fn erf(x: f64) -> f64 {
    // Series for small |x|, continued fraction (Lentz) for the tail: accurate to ~1e-15.
    if x.abs() < 2.5 {
        let mut sum = x;
        let mut term = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let z = x.abs();
        let mut f = z;
        for k in (1..60).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / f;
        x.signum() * (1.0 - erfc)
    }
}

/// `model.to_half()`, which must succeed where the adapter has `SHADER_F16`; elsewhere its
/// documented `Err` is asserted and `None` returned, so no f16 check is skipped silently.
pub fn to_half_or_refused(
    model: kiln::infer::InferenceModel,
) -> Option<kiln::infer::InferenceModel> {
    let has = model
        .device()
        .features()
        .contains(kiln::wgpu::Features::SHADER_F16);
    match model.to_half() {
        Ok(half) if has => Some(half),
        Err(e) if !has => {
            let e = e.to_string();
            assert!(e.contains("has no SHADER_F16 feature"), "{e}");
            None
        }
        Ok(_) => panic!("to_half succeeded without SHADER_F16"),
        Err(e) => panic!("to_half failed with SHADER_F16: {e}"),
    }
}

/// Trains `model` with Adam at `lr` over `epochs` of the digits training split, in batches of
/// `batch` shuffled by `seed`, and leaves it in eval mode.
pub fn train_digits(
    model: &mut dyn kiln::nn::Module,
    epochs: std::ops::Range<usize>,
    lr: f32,
    batch: usize,
    seed: u64,
    d: &Device,
) {
    use kiln::optim::Optimizer;
    let mut opt = kiln::optim::Adam::new(
        model.parameters(),
        kiln::optim::AdamOptions {
            lr,
            ..Default::default()
        },
    )
    .unwrap();
    let (train, _) = kiln::data::digits().unwrap().split(0.8, 0).unwrap();
    let loader = kiln::data::DataLoader::new(&train, batch, d).shuffle(seed);
    model.set_training(true);
    for epoch in epochs {
        for b in loader.epoch(epoch) {
            let b = b.unwrap();
            let logits = model.forward(&b.inputs).unwrap();
            let loss = kiln::loss::cross_entropy(&logits, &b.targets, &Default::default()).unwrap();
            opt.zero_grad();
            loss.backward().unwrap();
            opt.step().unwrap();
        }
    }
    model.set_training(false);
}

/// Accuracy (%) of a frozen model on the digits test split, and its predictions.
pub fn digits_accuracy(model: &kiln::infer::InferenceModel, d: &Device) -> (f64, Vec<usize>) {
    use kiln::data::Dataset;
    let (_, test) = kiln::data::digits().unwrap().split(0.8, 0).unwrap();
    let mut right = 0;
    let mut all = Vec::new();
    for b in kiln::data::DataLoader::new(&test, 64, d).epoch(0) {
        let b = b.unwrap();
        let p = model.classify(&b.inputs).unwrap();
        right += p.iter().zip(&b.labels).filter(|(p, l)| p == l).count();
        all.extend(p);
    }
    (100.0 * right as f64 / test.len() as f64, all)
}
