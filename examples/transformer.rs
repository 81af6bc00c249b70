//! Trains a small transformer encoder to sort sequences of digits, then reports how many
//! tokens and whole sequences it sorts right on sequences it has never seen.
//!
//! ```text
//! cargo run --release --example transformer [-- --steps 600]
//! ```
//!
//! Each sample is 8 random digits (0..10); the target at position i is the i-th smallest. The
//! model is a token embedding plus a learned position embedding, two
//! `TransformerEncoderLayer`s (width 32, 4 heads, feed-forward 64, pre-norm) and a linear head
//! over the 10 digits at every position, trained with Adam on per-token cross-entropy. It
//! shows a custom module: a struct of layers whose `visit` names them as PyTorch would.

use std::time::Instant;

use kiln::loss::{cross_entropy, CrossEntropyOptions};
use kiln::nn::{Embedding, Init, LayerNorm, Linear, Module, TensorRole, TransformerEncoderLayer};
use kiln::optim::{Adam, AdamOptions, CosineAnnealing, LrSchedule, Optimizer};
use kiln::{Device, Tensor};

const LEN: usize = 8;
const VOCAB: usize = 10;
const WIDTH: usize = 32;

/// Embeddings, encoder layers and a head; `forward` maps token ids (N, LEN) to logits
/// (N, LEN, VOCAB).
struct Sorter {
    tokens: Embedding,
    positions: Tensor,
    layers: Vec<TransformerEncoderLayer>,
    norm: LayerNorm,
    head: Linear,
}

impl Sorter {
    fn new(init: &mut Init) -> kiln::Result<Sorter> {
        let layers = (0..2)
            .map(|_| {
                let mut l = TransformerEncoderLayer::new(init, WIDTH, 4, 64)?;
                l.norm_first = true;
                // Fresh samples every step: nothing to overfit, so no dropout.
                l.set_dropout(0.0)?;
                Ok(l)
            })
            .collect::<kiln::Result<_>>()?;
        Ok(Sorter {
            tokens: Embedding::new(init, VOCAB, WIDTH)?,
            positions: init.uniform(&[LEN, WIDTH], 0.1)?,
            layers,
            norm: LayerNorm::new(init, &[WIDTH])?,
            head: Linear::new(init, WIDTH, VOCAB, true)?,
        })
    }
}

impl Module for Sorter {
    fn forward(&self, ids: &Tensor) -> kiln::Result<Tensor> {
        let mut h = self.tokens.forward(ids)?.add(&self.positions)?;
        for l in &self.layers {
            h = l.forward(&h)?;
        }
        self.head.forward(&self.norm.forward(&h)?)
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, TensorRole)) {
        let mut child = |prefix: &str, m: &dyn Module| {
            m.visit(&mut |n, t, r| f(&format!("{prefix}.{n}"), t, r));
        };
        child("tokens", &self.tokens);
        for (i, l) in self.layers.iter().enumerate() {
            child(&format!("layers.{i}"), l);
        }
        child("norm", &self.norm);
        child("head", &self.head);
        f("positions", &self.positions, TensorRole::Parameter);
    }

    fn describe(&self) -> String {
        format!(
            "Sorter(width {WIDTH}, {} layers, {} parameters)",
            self.layers.len(),
            self.parameter_count()
        )
    }
}

/// SplitMix64, for reproducible samples.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// A batch of `n` sequences and their sorted versions, as ids (N, LEN) and targets (N, LEN).
fn batch(rng: &mut Rng, n: usize, dev: &Device) -> kiln::Result<(Tensor, Tensor, Vec<f32>)> {
    let mut ids = Vec::with_capacity(n * LEN);
    let mut sorted = Vec::with_capacity(n * LEN);
    for _ in 0..n {
        let mut s: Vec<f32> = (0..LEN).map(|_| rng.below(VOCAB as u64) as f32).collect();
        ids.extend_from_slice(&s);
        s.sort_by(f32::total_cmp);
        sorted.extend_from_slice(&s);
    }
    Ok((
        Tensor::from_slice(&ids, &[n, LEN], dev)?,
        Tensor::from_slice(&sorted, &[n, LEN], dev)?,
        sorted,
    ))
}

/// Per-token cross-entropy: logits (N, LEN, VOCAB) as (N, VOCAB, LEN) against (N, LEN).
fn loss(model: &Sorter, ids: &Tensor, targets: &Tensor) -> kiln::Result<Tensor> {
    let logits = model.forward(ids)?.permute(&[0, 2, 1])?;
    cross_entropy(&logits, targets, &CrossEntropyOptions::default())
}

fn main() -> kiln::Result<()> {
    let mut steps = 600;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--steps", Some(v)) => steps = v,
            _ => {
                eprintln!("usage: transformer [--steps N]");
                std::process::exit(2);
            }
        }
    }
    let dev = Device::default_device()?;
    println!("device: {}", dev.name());
    let model = Sorter::new(&mut Init::new(&dev, 1))?;
    println!("{}", model.describe());
    let mut opt = Adam::new(
        model.parameters(),
        AdamOptions {
            lr: 3e-3,
            ..AdamOptions::adamw()
        },
    )?;
    let schedule = CosineAnnealing {
        base_lr: 3e-3,
        t_max: steps,
        eta_min: 1e-4,
    };
    let mut rng = Rng(7);
    let start = Instant::now();
    for step in 0..steps {
        opt.set_lr(schedule.lr_at(step));
        let (ids, targets, _) = batch(&mut rng, 64, &dev)?;
        let l = loss(&model, &ids, &targets)?;
        opt.zero_grad();
        l.backward()?;
        opt.step()?;
        if (step + 1) % 100 == 0 || step == 0 {
            println!(
                "step {:>4}/{steps}  loss {:.4}  {:.1} s",
                step + 1,
                l.to_scalar()?,
                start.elapsed().as_secs_f64()
            );
        }
    }
    // Held-out sequences (another seed): tokens and whole sequences sorted right.
    let mut test_rng = Rng(1_000_003);
    let (ids, _, sorted) = batch(&mut test_rng, 512, &dev)?;
    let predicted = kiln::no_grad(|| model.forward(&ids))?
        .argmax(-1, false)?
        .to_vec()?;
    let right_tokens = predicted
        .iter()
        .zip(&sorted)
        .filter(|(p, s)| p == s)
        .count();
    let right_sequences = predicted
        .chunks(LEN)
        .zip(sorted.chunks(LEN))
        .filter(|(p, s)| p == s)
        .count();
    let token_accuracy = right_tokens as f64 / sorted.len() as f64;
    println!(
        "held out: {:.1}% of tokens and {:.1}% of sequences sorted right ({:.1} s in all)",
        100.0 * token_accuracy,
        100.0 * right_sequences as f64 / 512.0,
        start.elapsed().as_secs_f64()
    );
    if token_accuracy < 0.9 {
        eprintln!("the model did not learn to sort");
        std::process::exit(1);
    }
    Ok(())
}
