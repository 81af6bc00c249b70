//! The sequence and container layers against PyTorch (tests/fixtures/gen_layers.py): the
//! state-dict names and shapes, the output and the gradients of the input and of every
//! parameter; and PyTorch's initialisations.

mod common;

use common::*;
use kiln::nn::{
    causal_mask, Activation, Conv1d, GroupNorm, Gru, Identity, Init, Linear, Lstm, Module,
    ModuleList, MultiheadAttention, Relu, TransformerEncoderLayer,
};
use kiln::{Result, Tensor};

/// The kiln layer of a fixture case, kept as its own type where the case calls its methods.
enum Layer {
    Plain(Box<dyn Module>),
    Attention(Box<MultiheadAttention>),
    Encoder(Box<TransformerEncoderLayer>),
    Lstm(Lstm),
}

impl Layer {
    fn module(&self) -> &dyn Module {
        match self {
            Layer::Plain(m) => m.as_ref(),
            Layer::Attention(m) => m.as_ref(),
            Layer::Encoder(m) => m.as_ref(),
            Layer::Lstm(m) => m,
        }
    }
}

/// The kiln layer of each fixture case and the number of inputs it takes.
fn build(kind: &str, init: &mut Init) -> (Layer, usize) {
    let plain = |m: Box<dyn Module>| (Layer::Plain(m), 1);
    match kind {
        "conv1d" => {
            let mut c = Conv1d::grouped(init, 4, 6, 3, 2, true).unwrap();
            c.stride = 2;
            c.padding = 1;
            plain(Box::new(c))
        }
        "group_norm" => plain(Box::new(GroupNorm::new(init, 3, 6).unwrap())),
        "mha_causal" => (
            Layer::Attention(Box::new(MultiheadAttention::new(init, 8, 2).unwrap())),
            1,
        ),
        "mha_cross_padding" => (
            Layer::Attention(Box::new(MultiheadAttention::new(init, 8, 4).unwrap())),
            2,
        ),
        "transformer_post_causal" => {
            // The fixtures run PyTorch with dropout 0.
            let mut t = TransformerEncoderLayer::new(init, 8, 2, 16).unwrap();
            t.set_dropout(0.0).unwrap();
            (Layer::Encoder(Box::new(t)), 1)
        }
        "transformer_pre_gelu" => {
            let mut t = TransformerEncoderLayer::new(init, 8, 2, 12).unwrap();
            t.set_dropout(0.0).unwrap();
            t.norm_first = true;
            t.activation = Activation::Gelu;
            plain(Box::new(t))
        }
        "lstm" => plain(Box::new(Lstm::new(init, 3, 5, 2, true).unwrap())),
        "lstm_state" => (Layer::Lstm(Lstm::new(init, 3, 4, 1, true).unwrap()), 1),
        "gru" => plain(Box::new(Gru::new(init, 3, 4, 2, true).unwrap())),
        other => panic!("no kiln layer for fixture case {other}"),
    }
}

/// Runs the fixture's computation (the Python lambda of the same case).
fn run(kind: &str, layer: &Layer, x: &[Tensor]) -> Result<Tensor> {
    let d = x[0].device().clone();
    match (kind, layer) {
        ("mha_causal", Layer::Attention(m)) => {
            m.attend(&x[0], &x[0], &x[0], Some(&causal_mask(5, &d)?), None)
        }
        ("mha_cross_padding", Layer::Attention(m)) => {
            let pad = Tensor::from_slice(&[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], &[2, 4], &d)?;
            m.attend(&x[0], &x[1], &x[1], None, Some(&pad))
        }
        ("transformer_post_causal", Layer::Encoder(t)) => {
            t.forward_masked(&x[0], Some(&causal_mask(5, &d)?), None)
        }
        ("lstm_state", Layer::Lstm(l)) => {
            let (y, (h, c)) = l.forward_with_state(&x[0], None)?;
            Tensor::concat(
                &[&y.reshape(&[-1])?, &h.reshape(&[-1])?, &c.reshape(&[-1])?],
                0,
            )
        }
        (_, layer) => layer.module().forward(&x[0]),
    }
}

/// Each case runs twice: with this adapter's kernel choices, and with the choices of a
/// hardware adapter (shared-memory tiles for the attention's batched products and the
/// recurrent projections), which are the default on GPUs.
#[test]
fn layers_match_pytorch() {
    let cases = load(include_str!("fixtures/layers.txt"));
    assert_eq!(cases.len(), 9, "cases in layers.txt");
    for as_hardware in [false, true] {
        dev().choose_as_hardware(as_hardware);
        check_layers(&cases);
    }
    dev().choose_as_hardware(false);
}

fn check_layers(cases: &[Case]) {
    for c in cases {
        let (kind, names) = c.name.split_once(':').unwrap();
        let names: Vec<&str> = names.split(',').collect();
        let (layer, n_inputs) = build(kind, &mut Init::new(&dev(), 0));
        let state = layer.module().state_dict();
        let ours: Vec<&str> = state.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(ours, names, "{kind}: state dict names and order");
        let leaves = leaves(c);
        assert_eq!(
            leaves.len(),
            n_inputs + state.len(),
            "{kind}: fixture inputs"
        );
        for ((name, t, _), v) in state.iter().zip(&leaves[n_inputs..]) {
            assert_eq!(t.dims(), v.dims(), "{kind}: {name} shape");
            t.assign(v).unwrap();
        }
        // The gradients to compare: the inputs' leaves, then the layer's own parameters.
        let mut grads_of: Vec<Tensor> = leaves[..n_inputs].to_vec();
        grads_of.extend(state.iter().map(|(_, t, _)| t.clone()));
        let y = run(kind, &layer, &leaves[..n_inputs]).unwrap_or_else(|e| panic!("{kind}: {e}"));
        check_case(c, &grads_of, &y, 2e-5, 1e-4);
    }
}

/// PyTorch's initialisations: uniform bounds (kaiming-uniform ±1/sqrt(fan_in) for Conv1d and
/// the output projection, xavier-uniform for the attention's input projection, ±1/sqrt(hidden)
/// for the recurrent weights), zero attention biases, unit/zero norms.
#[test]
fn initialisations_follow_pytorch() {
    let d = dev();
    let mut init = Init::new(&d, 3);
    let spread = |t: &Tensor| {
        let v = t.to_vec().unwrap();
        v.iter().fold(0f32, |m, x| m.max(x.abs()))
    };
    let near = |what: &str, t: &Tensor, bound: f32| {
        let s = spread(t);
        assert!(
            s <= bound && s > 0.9 * bound,
            "{what}: max |w| {s}, bound {bound}"
        );
    };
    let c = Conv1d::new(&mut init, 16, 8, 5, true).unwrap();
    near("Conv1d weight", &c.weight, 1.0 / 80f32.sqrt());
    let mha = MultiheadAttention::new(&mut init, 32, 4).unwrap();
    near(
        "in_proj_weight",
        &mha.in_proj_weight,
        (6.0f32 / 128.0).sqrt(),
    );
    near("out_proj.weight", &mha.out_proj.weight, 1.0 / 32f32.sqrt());
    assert_eq!(spread(mha.in_proj_bias.as_ref().unwrap()), 0.0);
    assert_eq!(spread(mha.out_proj.bias.as_ref().unwrap()), 0.0);
    let lstm = Lstm::new(&mut init, 6, 20, 1, true).unwrap();
    for (name, t) in lstm.named_parameters() {
        near(&format!("LSTM {name}"), &t, 1.0 / 20f32.sqrt());
    }
    let gn = GroupNorm::new(&mut init, 2, 4).unwrap();
    assert_eq!(gn.weight.unwrap().to_vec().unwrap(), vec![1.0; 4]);
    assert!(GroupNorm::new(&mut init, 3, 4).is_err());
    assert!(MultiheadAttention::new(&mut init, 10, 4).is_err());
    assert!(Lstm::new(&mut init, 0, 4, 1, true).is_err());
}

/// ModuleList names and switches its children and has no forward; Identity passes through;
/// bad shapes and masks are errors naming the layer.
#[test]
fn containers_and_misuse() {
    let d = dev();
    let mut init = Init::new(&d, 4);
    let mut list = ModuleList::new();
    list.push(Linear::new(&mut init, 3, 4, true).unwrap());
    list.push(Relu);
    list.push(kiln::nn::Dropout::new(&mut init, 0.5).unwrap());
    let names: Vec<String> = list
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["0.weight", "0.bias"]);
    assert_eq!(list.len(), 3);
    let x = Tensor::randn(&[2, 3], 1, &d).unwrap();
    assert!(list.forward(&x).is_err());
    list.set_training(false);
    let y = list
        .iter()
        .try_fold(x.clone(), |h, m| m.forward(&h))
        .unwrap();
    let z = list
        .iter()
        .try_fold(x.clone(), |h, m| m.forward(&h))
        .unwrap();
    assert_eq!(
        y.to_vec().unwrap(),
        z.to_vec().unwrap(),
        "eval mode reached the dropout"
    );
    assert_eq!(
        Identity.forward(&x).unwrap().to_vec().unwrap(),
        x.to_vec().unwrap()
    );
    let mha = MultiheadAttention::new(&mut init, 8, 2).unwrap();
    let q = Tensor::randn(&[2, 5, 8], 2, &d).unwrap();
    let e = mha
        .attend(&q, &q, &q, Some(&causal_mask(4, &d).unwrap()), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("MultiheadAttention") && e.contains("attn_mask"),
        "{e}"
    );
    assert!(mha
        .forward(&Tensor::randn(&[2, 5, 6], 2, &d).unwrap())
        .is_err());
    // Unbatched inputs work as in PyTorch.
    assert_eq!(
        mha.forward(&Tensor::randn(&[5, 8], 2, &d).unwrap())
            .unwrap()
            .dims(),
        &[5, 8]
    );
    // The encoder layer's dropout (PyTorch's 0.1): on in training, off in eval, settable.
    let mut enc = TransformerEncoderLayer::new(&mut init, 8, 2, 16).unwrap();
    let a = enc.forward(&q).unwrap().to_vec().unwrap();
    assert_ne!(
        a,
        enc.forward(&q).unwrap().to_vec().unwrap(),
        "dropout in training"
    );
    enc.set_training(false);
    let e = enc.forward(&q).unwrap().to_vec().unwrap();
    assert_eq!(e, enc.forward(&q).unwrap().to_vec().unwrap());
    enc.set_training(true);
    enc.set_dropout(0.0).unwrap();
    assert_eq!(
        enc.forward(&q).unwrap().to_vec().unwrap(),
        e,
        "dropout 0 in training is eval"
    );
    assert!(enc.set_dropout(1.5).is_err());
    let lstm = Lstm::new(&mut init, 3, 4, 2, true).unwrap();
    assert!(lstm
        .forward(&Tensor::randn(&[2, 5, 4], 1, &d).unwrap())
        .is_err());
    let (y, (h, c)) = lstm
        .forward_with_state(&Tensor::randn(&[5, 3], 1, &d).unwrap(), None)
        .unwrap();
    assert_eq!(
        (y.dims(), h.dims(), c.dims()),
        (&[5, 4][..], &[2, 4][..], &[2, 4][..])
    );
    let h0 = Tensor::zeros(&[1, 2, 4], &d).unwrap();
    assert!(lstm
        .forward_with_state(&Tensor::randn(&[2, 5, 3], 1, &d).unwrap(), Some((&h0, &h0)))
        .is_err());
}

/// The typed configurations build the layers the positional constructors build (same seed,
/// same tensors), with PyTorch's defaults and names.
#[test]
fn configs_build_the_same_layers() {
    use kiln::nn::{
        Conv1dConfig, Conv2dConfig, EmbeddingConfig, LayerNormConfig, LinearConfig,
        MultiheadAttentionConfig, RnnConfig, TransformerEncoderLayerConfig,
    };
    use kiln::Conv2dOptions;
    let d = dev();
    let same = |what: &str, a: &dyn Module, b: &dyn Module| {
        let sa: Vec<(String, Vec<f32>)> = a
            .state_dict()
            .into_iter()
            .map(|(n, t, _)| (n, t.to_vec().unwrap()))
            .collect();
        let sb: Vec<(String, Vec<f32>)> = b
            .state_dict()
            .into_iter()
            .map(|(n, t, _)| (n, t.to_vec().unwrap()))
            .collect();
        assert_eq!(sa, sb, "{what}");
    };
    let i = || Init::new(&dev(), 5);
    same(
        "linear",
        &LinearConfig::new(4, 3).bias(false).init(&mut i()).unwrap(),
        &Linear::new(&mut i(), 4, 3, false).unwrap(),
    );
    let opts = Conv2dOptions {
        stride: [2, 2],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 2,
    };
    same(
        "conv2d",
        &Conv2dConfig::new(4, 6, 3)
            .stride(2)
            .padding(1)
            .groups(2)
            .init(&mut i())
            .unwrap(),
        &kiln::nn::Conv2d::new(&mut i(), 4, 6, [3, 3], opts, true).unwrap(),
    );
    let c1 = Conv1dConfig::new(4, 6, 3)
        .stride(2)
        .padding(1)
        .groups(2)
        .init(&mut i())
        .unwrap();
    assert_eq!((c1.stride, c1.padding, c1.groups), (2, 1, 2));
    same(
        "conv1d",
        &c1,
        &Conv1d::grouped(&mut i(), 4, 6, 3, 2, true).unwrap(),
    );
    same(
        "embedding",
        &EmbeddingConfig::new(7, 3).init(&mut i()).unwrap(),
        &kiln::nn::Embedding::new(&mut i(), 7, 3).unwrap(),
    );
    assert_eq!(
        LayerNormConfig::new(&[5])
            .eps(1e-3)
            .init(&mut i())
            .unwrap()
            .eps,
        1e-3
    );
    let t = TransformerEncoderLayerConfig::new(8, 2)
        .dim_feedforward(16)
        .init(&mut i())
        .unwrap();
    same(
        "transformer",
        &t,
        &TransformerEncoderLayer::new(&mut i(), 8, 2, 16).unwrap(),
    );
    assert_eq!(
        TransformerEncoderLayerConfig::new(8, 2).dim_feedforward,
        2048,
        "PyTorch's default"
    );
    same(
        "lstm",
        &RnnConfig::new(3, 4).num_layers(2).lstm(&mut i()).unwrap(),
        &Lstm::new(&mut i(), 3, 4, 2, true).unwrap(),
    );
    same(
        "gru",
        &RnnConfig::new(3, 4).gru(&mut i()).unwrap(),
        &Gru::new(&mut i(), 3, 4, 1, true).unwrap(),
    );
    let m = MultiheadAttentionConfig::new(8, 2)
        .bias(false)
        .init(&mut i())
        .unwrap();
    let names: Vec<String> = m.state_dict().into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(
        names,
        ["in_proj_weight", "out_proj.weight"],
        "bias=False as PyTorch names it"
    );
    let q = Tensor::randn(&[2, 3, 8], 1, &d).unwrap();
    assert_eq!(m.forward(&q).unwrap().dims(), &[2, 3, 8]);
    assert!(Conv2dConfig::new(3, 4, 3).groups(2).init(&mut i()).is_err());
}
