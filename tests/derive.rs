//! `#[derive(Module)]`: PyTorch names for fields, nested modules, vectors, options and boxes;
//! eval mode reaching every sub-module; checkpoints of derived modules.

mod common;

use common::*;
use kiln::nn::{
    BatchNorm, Conv2d, Embedding, Init, Linear, Module, Residual, Sequential, TensorRole,
    TransformerEncoderLayer,
};
use kiln::{Conv2dOptions, Tensor};

/// torchvision's BasicBlock, written as a user would with the derive.
#[derive(Module)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Sequential>,
}

impl Block {
    fn new(init: &mut Init, cin: usize, cout: usize, stride: usize) -> kiln::Result<Block> {
        let conv = |init: &mut Init, cin, k, stride, pad| {
            let o = Conv2dOptions {
                stride: [stride; 2],
                padding: [pad; 2],
                ..Default::default()
            };
            Conv2d::new(init, cin, cout, [k; 2], o, false)
        };
        Ok(Block {
            conv1: conv(init, cin, 3, stride, 1)?,
            bn1: BatchNorm::new_2d(init, cout)?,
            conv2: conv(init, cout, 3, 1, 1)?,
            bn2: BatchNorm::new_2d(init, cout)?,
            downsample: if stride != 1 || cin != cout {
                Some(
                    Sequential::new()
                        .add(conv(init, cin, 1, stride, 0)?)
                        .add(BatchNorm::new_2d(init, cout)?),
                )
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> kiln::Result<Tensor> {
        let y = self.bn2.forward(
            &self
                .conv2
                .forward(&self.bn1.forward(&self.conv1.forward(x)?)?.relu()?)?,
        )?;
        let skip = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        y.add(&skip)?.relu()
    }
}

/// A small transformer: embeddings, a vector of encoder layers, a boxed head, a buffer, a
/// skipped field and configuration.
#[derive(Module)]
struct Tiny {
    embed: Embedding,
    positions: Tensor,
    layers: Vec<TransformerEncoderLayer>,
    head: Box<dyn Module>,
    #[module(buffer)]
    steps_seen: Tensor,
    #[module(skip)]
    cache: Option<Tensor>,
    width: usize,
}

impl Tiny {
    fn forward(&self, ids: &Tensor) -> kiln::Result<Tensor> {
        let _ = (&self.cache, self.width);
        let mut h = self.embed.forward(ids)?.add(&self.positions)?;
        for l in &self.layers {
            h = l.forward(&h)?;
        }
        self.head.forward(&h)
    }
}

fn tiny(seed: u64) -> Tiny {
    let d = dev();
    let mut init = Init::new(&d, seed);
    Tiny {
        embed: Embedding::new(&mut init, 10, 8).unwrap(),
        positions: init.uniform(&[5, 8], 0.1).unwrap(),
        layers: (0..2)
            .map(|_| TransformerEncoderLayer::new(&mut init, 8, 2, 16).unwrap())
            .collect(),
        head: Box::new(
            Sequential::new()
                .add(Linear::new(&mut init, 8, 10, true).unwrap())
                .add(kiln::nn::Dropout::new(&mut init, 0.5).unwrap()),
        ),
        steps_seen: Tensor::zeros(&[], &d).unwrap(),
        cache: None,
        width: 8,
    }
}

/// The derived block is named as torchvision names BasicBlock (the names the library's
/// Residual::basic_block uses, which PyTorch loads strictly), computes what that block
/// computes from the same weights, and eval mode reaches its batch norms.
#[test]
fn a_derived_residual_block_matches_the_library_block() {
    let d = dev();
    for (cin, cout, stride) in [(4, 8, 2), (8, 8, 1)] {
        let mut ours = Block::new(&mut Init::new(&d, 1), cin, cout, stride).unwrap();
        let mut theirs = Residual::basic_block(&mut Init::new(&d, 1), cin, cout, stride).unwrap();
        let names = |m: &dyn Module| -> Vec<(String, TensorRole)> {
            m.state_dict().into_iter().map(|(n, _, r)| (n, r)).collect()
        };
        assert_eq!(names(&ours), names(&theirs));
        assert_eq!(ours.parameter_count(), theirs.parameter_count());
        assert!(ours.describe().starts_with("Block(") && ours.describe().contains("parameters"));
        let x = Tensor::randn(&[2, cin, 6, 6], 3, &d).unwrap();
        // Training mode (batch statistics): same outputs and same running statistics.
        let a = Module::forward(&ours, &x).unwrap().to_vec().unwrap();
        let b = theirs.forward(&x).unwrap().to_vec().unwrap();
        assert_eq!(a, b, "training mode");
        // Eval mode must reach every batch norm (the shortcut's too): the running statistics
        // make the outputs differ from the batch-statistics ones, equally for both.
        ours.set_training(false);
        theirs.set_training(false);
        let a_eval = Module::forward(&ours, &x).unwrap().to_vec().unwrap();
        assert_eq!(
            a_eval,
            theirs.forward(&x).unwrap().to_vec().unwrap(),
            "eval mode"
        );
        assert_ne!(a_eval, a, "eval mode uses the running statistics");
    }
}

/// Vectors, boxes, buffers, skipped fields: names, eval mode through a boxed Sequential's
/// dropout, optimizer parameters, and a checkpoint round trip between two derived models.
#[test]
fn a_derived_transformer_names_switches_and_round_trips() {
    let d = dev();
    let mut model = tiny(1);
    let state = model.state_dict();
    let names: Vec<&str> = state.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names[0], "embed.weight");
    assert_eq!(names[1], "positions");
    assert_eq!(names[2], "layers.0.self_attn.in_proj_weight");
    assert!(names.contains(&"layers.1.norm2.bias"));
    assert!(names.contains(&"head.0.weight"));
    assert_eq!(*names.last().unwrap(), "steps_seen");
    assert_eq!(state.last().unwrap().2, TensorRole::Buffer);
    assert!(!names
        .iter()
        .any(|n| n.starts_with("cache") || n.starts_with("width")));
    assert_eq!(model.parameters().len(), state.len() - 1);
    let ids = Tensor::from_slice(
        &[1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 9.0, 8.0, 7.0, 6.0],
        &[2, 5],
        &d,
    )
    .unwrap();
    let t1 = Module::forward(&model, &ids).unwrap().to_vec().unwrap();
    let t2 = Module::forward(&model, &ids).unwrap().to_vec().unwrap();
    assert_ne!(t1, t2, "the boxed head's dropout is on in training");
    model.set_training(false);
    let e1 = Module::forward(&model, &ids).unwrap().to_vec().unwrap();
    assert_eq!(
        e1,
        Module::forward(&model, &ids).unwrap().to_vec().unwrap(),
        "eval reached the dropout"
    );
    let path = std::env::temp_dir().join(format!("kiln-derive-{}.safetensors", std::process::id()));
    kiln::checkpoint::save(&path, &model, None, None).unwrap();
    let mut copy = tiny(2);
    kiln::checkpoint::load(&path, &copy, None).unwrap();
    std::fs::remove_file(&path).ok();
    copy.set_training(false);
    assert_eq!(Module::forward(&copy, &ids).unwrap().to_vec().unwrap(), e1);
}
