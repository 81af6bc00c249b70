//! Graph rewrites, one small function each. They keep the graph in topological order and
//! leave nodes they replace unused, for [`eliminate_dead`] to remove.

use super::graph::{fusable_activation, DType, Graph, Node, OpKind, Src};
use crate::error::Result;
use crate::ops::elementwise::BinaryOp;
use crate::tensor::Tensor;

/// All rewrites, in the order that lets each one see what the previous made.
pub(crate) fn optimize(g: &mut Graph) -> Result<()> {
    eliminate_dead(g);
    fuse_linear(g);
    fuse_bias(g)?;
    fold_batch_norm(g)?;
    fuse_activation(g);
    fold_constants(g)?;
    eliminate_dead(g);
    Ok(())
}

/// Every reader of `from` reads `to` instead.
fn replace_uses(g: &mut Graph, from: Src, to: Src) {
    for src in g
        .nodes
        .iter_mut()
        .flat_map(|n| n.inputs.iter_mut())
        .chain(g.outputs.iter_mut())
    {
        if *src == from {
            *src = to;
        }
    }
}

fn add_const(g: &mut Graph, t: Tensor) -> Src {
    g.consts.push(t);
    g.const_dtypes.push(DType::F32);
    Src::Const(g.consts.len() - 1)
}

fn node_of(src: Src) -> Option<usize> {
    match src {
        Src::Node(k) => Some(k),
        _ => None,
    }
}

/// Removes nodes no output depends on, and constants no node reads.
pub(crate) fn eliminate_dead(g: &mut Graph) {
    let mut live = vec![false; g.nodes.len()];
    for s in &g.outputs {
        if let Src::Node(k) = s {
            live[*k] = true;
        }
    }
    for i in (0..g.nodes.len()).rev() {
        if live[i] {
            for s in &g.nodes[i].inputs {
                if let Src::Node(k) = s {
                    live[*k] = true;
                }
            }
        }
    }
    let mut node_map = vec![usize::MAX; g.nodes.len()];
    let old = std::mem::take(&mut g.nodes);
    for (i, n) in old.into_iter().enumerate() {
        if live[i] {
            node_map[i] = g.nodes.len();
            g.nodes.push(n);
        }
    }
    let mut used = vec![false; g.consts.len()];
    for s in g.nodes.iter().flat_map(|n| &n.inputs).chain(&g.outputs) {
        if let Src::Const(k) = s {
            used[*k] = true;
        }
    }
    let mut const_map = vec![usize::MAX; g.consts.len()];
    let consts = std::mem::take(&mut g.consts);
    let dtypes = std::mem::take(&mut g.const_dtypes);
    for (k, (t, d)) in consts.into_iter().zip(dtypes).enumerate() {
        if used[k] {
            const_map[k] = g.consts.len();
            g.consts.push(t);
            g.const_dtypes.push(d);
        }
    }
    let remap = |s: &mut Src| match s {
        Src::Node(k) => *k = node_map[*k],
        Src::Const(k) => *k = const_map[*k],
        Src::Input(_) => {}
    };
    for n in &mut g.nodes {
        n.inputs.iter_mut().for_each(remap);
    }
    g.outputs.iter_mut().for_each(remap);
}

/// `x @ W^T` with a constant `W` (a linear layer's `x.matmul(&w.t())`) becomes one linear
/// node reading `W` as stored, so no transposed copy is made.
pub(crate) fn fuse_linear(g: &mut Graph) {
    for i in 0..g.nodes.len() {
        if g.nodes[i].op != OpKind::Matmul {
            continue;
        }
        let Some(j) = node_of(g.nodes[i].inputs[1]) else {
            continue;
        };
        let (OpKind::Permute { perm }, [Src::Const(c)]) = (&g.nodes[j].op, &g.nodes[j].inputs[..])
        else {
            continue;
        };
        let c = *c;
        if perm[..] != [1, 0] || g.consts[c].rank() != 2 || g.const_dtypes[c] != DType::F32 {
            continue;
        }
        g.nodes[i].op = OpKind::Linear {
            bias: false,
            act: None,
        };
        g.nodes[i].inputs[1] = Src::Const(c);
    }
}

/// The producer (a conv2d or linear node without activation, read only by `reader`) that a
/// per-channel rewrite can fold into.
fn sole_producer(g: &Graph, users: &[usize], src: Src) -> Option<usize> {
    let p = node_of(src)?;
    let ok = match &g.nodes[p].op {
        OpKind::Conv2d { act: None, .. } => g.nodes[p].shape.len() == 4,
        OpKind::Linear { act: None, .. } => true,
        _ => false,
    };
    let consts = g.nodes[p].inputs[1..]
        .iter()
        .all(|s| matches!(s, Src::Const(_)));
    (ok && consts && users[p] == 1).then_some(p)
}

fn set_bias(node: &mut Node, bias: Src) {
    match &mut node.op {
        OpKind::Conv2d { bias: b, .. } | OpKind::Linear { bias: b, .. } => *b = true,
        _ => return,
    }
    node.inputs.truncate(2);
    node.inputs.push(bias);
}

fn const_tensor(g: &Graph, s: Src) -> Option<&Tensor> {
    match s {
        Src::Const(k) => Some(&g.consts[k]),
        _ => None,
    }
}

/// An eval-mode batch norm right after a conv2d or linear node that nothing else reads is
/// folded into that node's weight and bias: `w * s` along the output channels and
/// `(b - mean) * s + beta`, with `s = gamma / sqrt(var + eps)`.
pub(crate) fn fold_batch_norm(g: &mut Graph) -> Result<()> {
    eliminate_dead(g);
    let _no_grad = crate::autograd::NoGradGuard::new();
    for i in 0..g.nodes.len() {
        let OpKind::BatchNorm { eps, weight, bias } = g.nodes[i].op else {
            continue;
        };
        let users = g.users();
        let Some(p) = sole_producer(g, &users, g.nodes[i].inputs[0]) else {
            continue;
        };
        // Batch norm normalises axis 1: a linear's output channels only for (N, C).
        if matches!(g.nodes[p].op, OpKind::Linear { .. }) && g.nodes[p].shape.len() != 2 {
            continue;
        }
        let ins = g.nodes[i].inputs.clone();
        let Some(stats) = ins[1..]
            .iter()
            .map(|&s| const_tensor(g, s).cloned())
            .collect::<Option<Vec<Tensor>>>()
        else {
            continue;
        };
        let (mean, var) = (&stats[0], &stats[1]);
        let gamma = weight.then(|| &stats[2]);
        let beta = bias.then(|| &stats[2 + weight as usize]);
        let mut scale = var.add_scalar(eps)?.rsqrt()?;
        if let Some(w) = gamma {
            scale = scale.mul(w)?;
        }
        let w = const_tensor(g, g.nodes[p].inputs[1])
            .cloned()
            .ok_or_else(|| internal("weight"))?;
        let old_bias = g.nodes[p]
            .inputs
            .get(2)
            .and_then(|&s| const_tensor(g, s).cloned());
        let mut s_shape = vec![1usize; w.rank()];
        s_shape[0] = scale.numel();
        let w2 = w.mul(&scale.reshape_to(&s_shape)?)?.contiguous()?;
        let mut b2 = match old_bias {
            Some(b) => b.sub(mean)?.mul(&scale)?,
            None => mean.mul(&scale)?.neg()?,
        };
        if let Some(b) = beta {
            b2 = b2.add(b)?;
        }
        let (w_src, b_src) = (add_const(g, w2), add_const(g, b2.contiguous()?));
        g.nodes[p].inputs[1] = w_src;
        set_bias(&mut g.nodes[p], b_src);
        replace_uses(g, Src::Node(i), Src::Node(p));
    }
    Ok(())
}

fn internal(what: &str) -> crate::Error {
    crate::Error::invalid("freeze", format!("internal: a fused node lost its {what}"))
}

/// `producer + c` with a constant `c` along the output channels, after a conv2d or linear
/// node without bias that nothing else reads, becomes that node's bias.
pub(crate) fn fuse_bias(g: &mut Graph) -> Result<()> {
    // Readers that earlier rewrites left unused must not count as users.
    eliminate_dead(g);
    for i in 0..g.nodes.len() {
        if g.nodes[i].op != (OpKind::Binary { op: BinaryOp::Add }) {
            continue;
        }
        let users = g.users();
        let ins = g.nodes[i].inputs.clone();
        for (a, b) in [(ins[0], ins[1]), (ins[1], ins[0])] {
            let Some(p) = sole_producer(g, &users, a) else {
                continue;
            };
            let Some(c) = const_tensor(g, b).cloned() else {
                continue;
            };
            let has_bias = matches!(
                g.nodes[p].op,
                OpKind::Conv2d { bias: true, .. } | OpKind::Linear { bias: true, .. }
            );
            if has_bias || g.nodes[i].shape != g.nodes[p].shape {
                continue;
            }
            // Output channels: axis 1 of a conv, the last axis of a linear.
            let conv = matches!(g.nodes[p].op, OpKind::Conv2d { .. });
            let shape = &g.nodes[p].shape;
            let axis = if conv {
                1
            } else {
                shape.len().saturating_sub(1)
            };
            let channels = match shape.get(axis) {
                Some(d) if !d.is_dynamic() => d.fixed as usize,
                _ => continue,
            };
            let mut dims: Vec<usize> = c.dims().to_vec();
            let trailing = if conv {
                vec![channels, 1, 1]
            } else {
                vec![channels]
            };
            while dims.len() > trailing.len() && dims[0] == 1 {
                dims.remove(0);
            }
            if dims != trailing {
                continue;
            }
            let bias = c.reshape_to(&[channels])?.contiguous()?;
            let src = add_const(g, bias);
            set_bias(&mut g.nodes[p], src);
            replace_uses(g, Src::Node(i), Src::Node(p));
            break;
        }
    }
    Ok(())
}

/// An activation of a conv2d or linear node that nothing else reads runs in that node's
/// epilogue.
pub(crate) fn fuse_activation(g: &mut Graph) {
    eliminate_dead(g);
    for i in 0..g.nodes.len() {
        let OpKind::Unary { op, alpha, .. } = g.nodes[i].op else {
            continue;
        };
        if !fusable_activation(op) {
            continue;
        }
        let users = g.users();
        let Some(p) = node_of(g.nodes[i].inputs[0]) else {
            continue;
        };
        if users[p] != 1 {
            continue;
        }
        match &mut g.nodes[p].op {
            OpKind::Conv2d {
                act: act @ None, ..
            }
            | OpKind::Linear {
                act: act @ None, ..
            } => {
                *act = Some((op, alpha));
            }
            _ => continue,
        }
        replace_uses(g, Src::Node(i), Src::Node(p));
    }
}

/// Nodes that read only constants (such as `w.t()` or a scale of a weight) are computed
/// once, here, and become constants.
pub(crate) fn fold_constants(g: &mut Graph) -> Result<()> {
    let _no_grad = crate::autograd::NoGradGuard::new();
    for i in 0..g.nodes.len() {
        let node = &mut g.nodes[i];
        let dynamic = node.op.clone().dims_mut().iter().any(|d| d.is_dynamic());
        let all_const = node.inputs.iter().all(|s| matches!(s, Src::Const(_)));
        if dynamic || !all_const || node.dtype != DType::F32 {
            continue;
        }
        // An op without operands (`full`) allocates where the weights live.
        let Some(dev) = g.consts.first().map(|c| c.device().clone()) else {
            continue;
        };
        let ins: Vec<Tensor> = g.nodes[i]
            .inputs
            .iter()
            .filter_map(|&s| const_tensor(g, s).cloned())
            .collect();
        if ins
            .iter()
            .zip(&g.nodes[i].inputs)
            .any(|(_, s)| matches!(s, Src::Const(k) if g.const_dtypes[*k] != DType::F32))
        {
            continue;
        }
        let refs: Vec<&Tensor> = ins.iter().collect();
        let value = g.nodes[i].op.apply(&refs, 0, &dev)?.contiguous()?;
        let src = add_const(g, value);
        replace_uses(g, Src::Node(i), src);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::graph::{Dim, InputSpec};
    use crate::ops::elementwise::UnaryOp;
    use crate::{Conv2dOptions, Device};

    fn dims(v: &[usize]) -> Vec<Dim> {
        let mut d: Vec<Dim> = v.iter().map(|&x| Dim::fixed(x)).collect();
        d[0] = Dim {
            per_batch: 1,
            fixed: 0,
        };
        d
    }

    fn node(op: OpKind, inputs: Vec<Src>, shape: &[usize]) -> Node {
        Node {
            op,
            inputs,
            shape: dims(shape),
            dtype: DType::F32,
        }
    }

    fn graph(consts: Vec<Tensor>, nodes: Vec<Node>, input: &[usize]) -> Graph {
        let n = nodes.len();
        Graph {
            inputs: vec![InputSpec { shape: dims(input) }],
            const_dtypes: vec![DType::F32; consts.len()],
            consts,
            nodes,
            outputs: vec![Src::Node(n - 1)],
        }
    }

    /// The graph's output at batch size 2 for a random input.
    fn run(g: &Graph, dev: &Device) -> Vec<f32> {
        let x = Tensor::randn(&dims_fixed(&g.inputs[0].shape, 2), 7, dev).unwrap();
        let mut vals: Vec<Tensor> = Vec::new();
        for n in &g.nodes {
            let ins: Vec<Tensor> = n
                .inputs
                .iter()
                .map(|s| match *s {
                    Src::Input(_) => x.clone(),
                    Src::Const(k) => g.consts[k].clone(),
                    Src::Node(k) => vals[k].clone(),
                })
                .collect();
            let refs: Vec<&Tensor> = ins.iter().collect();
            vals.push(n.op.apply(&refs, 2, x.device()).unwrap());
        }
        let Src::Node(k) = g.outputs[0] else {
            panic!("output is not a node")
        };
        vals[k].to_vec().unwrap()
    }

    fn dims_fixed(d: &[Dim], n: usize) -> Vec<usize> {
        d.iter().map(|d| d.at(n).unwrap()).collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    fn conv_bn_relu(dev: &Device) -> Graph {
        let r = |s: &[usize], seed| Tensor::randn(s, seed, dev).unwrap();
        let var = r(&[3], 5).abs().unwrap().add_scalar(0.5).unwrap();
        let consts = vec![
            r(&[3, 2, 3, 3], 1),
            r(&[3], 2),
            r(&[3], 3),
            var,
            r(&[3], 4),
            r(&[3], 6),
        ];
        let conv = OpKind::Conv2d {
            opts: Conv2dOptions::default(),
            bias: true,
            act: None,
        };
        let nodes = vec![
            node(
                conv,
                vec![Src::Input(0), Src::Const(0), Src::Const(1)],
                &[2, 3, 3, 3],
            ),
            node(
                OpKind::BatchNorm {
                    eps: 1e-5,
                    weight: true,
                    bias: true,
                },
                vec![
                    Src::Node(0),
                    Src::Const(2),
                    Src::Const(3),
                    Src::Const(4),
                    Src::Const(5),
                ],
                &[2, 3, 3, 3],
            ),
            node(
                OpKind::Unary {
                    op: UnaryOp::Relu,
                    alpha: 0.0,
                    beta: 0.0,
                },
                vec![Src::Node(1)],
                &[2, 3, 3, 3],
            ),
        ];
        graph(consts, nodes, &[2, 2, 5, 5])
    }

    #[test]
    fn batch_norm_folds_into_a_sole_producer_and_activation_fuses() {
        let dev = Device::default_device().unwrap();
        let mut g = conv_bn_relu(&dev);
        let before = run(&g, &dev);
        fold_batch_norm(&mut g).unwrap();
        fuse_activation(&mut g);
        eliminate_dead(&mut g);
        assert_eq!(g.nodes.len(), 1, "{}", g.describe());
        assert!(matches!(
            g.nodes[0].op,
            OpKind::Conv2d {
                bias: true,
                act: Some((UnaryOp::Relu, _)),
                ..
            }
        ));
        close(&run(&g, &dev), &before);
    }

    #[test]
    fn batch_norm_stays_when_the_producer_has_another_user() {
        let dev = Device::default_device().unwrap();
        let mut g = conv_bn_relu(&dev);
        // A second reader of the conv output: %3 = %0 + %2.
        g.nodes.push(node(
            OpKind::Binary { op: BinaryOp::Add },
            vec![Src::Node(0), Src::Node(2)],
            &[2, 3, 3, 3],
        ));
        g.outputs = vec![Src::Node(3)];
        let before = run(&g, &dev);
        fold_batch_norm(&mut g).unwrap();
        fuse_activation(&mut g);
        eliminate_dead(&mut g);
        assert!(g
            .nodes
            .iter()
            .any(|n| matches!(n.op, OpKind::BatchNorm { .. })));
        assert!(matches!(g.nodes[0].op, OpKind::Conv2d { act: None, .. }));
        close(&run(&g, &dev), &before);
    }

    #[test]
    fn linear_bias_and_constant_subgraphs() {
        let dev = Device::default_device().unwrap();
        let r = |s: &[usize], seed| Tensor::randn(s, seed, &dev).unwrap();
        let consts = vec![r(&[4, 3], 1), r(&[4], 2)];
        let nodes = vec![
            // w * 0.5, then its transpose: both only read constants.
            node(
                OpKind::BinaryScalar {
                    op: BinaryOp::Mul,
                    scalar: 0.5,
                    left: false,
                },
                vec![Src::Const(0)],
                &[4, 3],
            ),
            node(
                OpKind::Permute { perm: vec![1, 0] },
                vec![Src::Node(0)],
                &[3, 4],
            ),
            node(OpKind::Matmul, vec![Src::Input(0), Src::Node(1)], &[2, 4]),
            node(
                OpKind::Binary { op: BinaryOp::Add },
                vec![Src::Node(2), Src::Const(1)],
                &[2, 4],
            ),
            node(
                OpKind::Unary {
                    op: UnaryOp::Tanh,
                    alpha: 0.0,
                    beta: 0.0,
                },
                vec![Src::Node(3)],
                &[2, 4],
            ),
        ];
        let mut g = graph(consts, nodes, &[2, 3]);
        // Shapes that do not depend on the batch.
        g.nodes[0].shape = vec![Dim::fixed(4), Dim::fixed(3)];
        g.nodes[1].shape = vec![Dim::fixed(3), Dim::fixed(4)];
        let before = run(&g, &dev);
        fold_constants(&mut g).unwrap();
        eliminate_dead(&mut g);
        assert_eq!(g.nodes.len(), 3, "{}", g.describe());
        // A folded w.t() is a plain matrix now; the matmul reads it directly.
        close(&run(&g, &dev), &before);
        let mut g = graph(
            vec![r(&[4, 3], 1).mul_scalar(0.5).unwrap(), r(&[4], 2)],
            vec![
                node(
                    OpKind::Permute { perm: vec![1, 0] },
                    vec![Src::Const(0)],
                    &[3, 4],
                ),
                node(OpKind::Matmul, vec![Src::Input(0), Src::Node(0)], &[2, 4]),
                node(
                    OpKind::Binary { op: BinaryOp::Add },
                    vec![Src::Const(1), Src::Node(1)],
                    &[2, 4],
                ),
                node(
                    OpKind::Unary {
                        op: UnaryOp::Tanh,
                        alpha: 0.0,
                        beta: 0.0,
                    },
                    vec![Src::Node(2)],
                    &[2, 4],
                ),
            ],
            &[2, 3],
        );
        g.nodes[0].shape = vec![Dim::fixed(3), Dim::fixed(4)];
        optimize(&mut g).unwrap();
        assert_eq!(g.nodes.len(), 1, "{}", g.describe());
        assert!(matches!(
            g.nodes[0].op,
            OpKind::Linear {
                bias: true,
                act: Some((UnaryOp::Tanh, _))
            }
        ));
        close(&run(&g, &dev), &before);
    }

    #[test]
    fn bias_fuses_along_the_last_axis_of_a_rank3_linear() {
        // x [2, 5, 3] @ W^T [3, 4] + b [4], then GELU: one linear node with bias and
        // activation. A [5, 1] addend (along the sequence axis) is no bias and stays.
        let dev = Device::default_device().unwrap();
        let r = |s: &[usize], seed| Tensor::randn(s, seed, &dev).unwrap();
        for (addend, fused) in [(vec![4usize], true), (vec![5, 1], false)] {
            let linear = OpKind::Linear {
                bias: false,
                act: None,
            };
            let gelu = OpKind::Unary {
                op: UnaryOp::Gelu,
                alpha: 0.0,
                beta: 0.0,
            };
            let add = OpKind::Binary { op: BinaryOp::Add };
            let nodes = vec![
                node(linear, vec![Src::Input(0), Src::Const(0)], &[2, 5, 4]),
                node(add, vec![Src::Node(0), Src::Const(1)], &[2, 5, 4]),
                node(gelu, vec![Src::Node(1)], &[2, 5, 4]),
            ];
            let mut g = graph(vec![r(&[4, 3], 1), r(&addend, 2)], nodes, &[2, 5, 3]);
            let before = run(&g, &dev);
            optimize(&mut g).unwrap();
            assert_eq!(g.nodes.len() == 1, fused, "{}", g.describe());
            close(&run(&g, &dev), &before);
        }
    }

    #[test]
    fn dead_nodes_and_unread_constants_go() {
        let dev = Device::default_device().unwrap();
        let r = |s: &[usize], seed| Tensor::randn(s, seed, &dev).unwrap();
        let nodes = vec![
            node(
                OpKind::Unary {
                    op: UnaryOp::Exp,
                    alpha: 0.0,
                    beta: 0.0,
                },
                vec![Src::Input(0)],
                &[2, 3],
            ),
            node(
                OpKind::Binary { op: BinaryOp::Mul },
                vec![Src::Input(0), Src::Const(1)],
                &[2, 3],
            ),
        ];
        let mut g = graph(vec![r(&[3], 1), r(&[3], 2)], nodes, &[2, 3]);
        eliminate_dead(&mut g);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.consts.len(), 1);
        assert_eq!(g.nodes[0].inputs, vec![Src::Input(0), Src::Const(0)]);
    }
}
