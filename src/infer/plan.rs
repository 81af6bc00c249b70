//! The memory plan of one set of input shapes: every value's shape (checked on the CPU
//! before any GPU work), when each value dies, and the activation buffers that liveness
//! needs, reused by size class. Running the graph frees each value after its last reader,
//! so the device's pool hands its buffer to the next node of the same size class.

use super::graph::{Graph, OpKind, Src};
use crate::error::{Error, Result};

/// A plan for one set of input shapes.
pub(crate) struct Plan {
    /// The batch size.
    pub n: usize,
    /// Output shape of every node.
    pub shapes: Vec<Vec<usize>>,
    /// The nodes whose values are dropped after each node runs.
    pub frees: Vec<Vec<usize>>,
    /// Bytes of activation buffers the plan needs at once (size classes, reuse by liveness).
    pub planned_bytes: u64,
    /// Bytes of all activations, as if none were reused.
    pub activation_bytes: u64,
}

impl Plan {
    /// Host bytes the plan holds (its shapes and free lists).
    pub(crate) fn host_bytes(&self) -> usize {
        let words: usize = self.shapes.iter().map(Vec::len).sum::<usize>()
            + self.frees.iter().map(Vec::len).sum::<usize>();
        std::mem::size_of::<Plan>() + (words + 2 * self.shapes.len()) * std::mem::size_of::<usize>()
    }
}

/// True when the node's output is a view of its first operand's storage.
fn is_view(op: &OpKind) -> bool {
    matches!(
        op,
        OpKind::Reshape { .. }
            | OpKind::Permute { .. }
            | OpKind::Expand { .. }
            | OpKind::Narrow { .. }
    )
}

/// The batch size that input shapes `shapes` give the graph's inputs.
pub(crate) fn batch_of(g: &Graph, shapes: &[Vec<usize>]) -> Result<usize> {
    const OP: &str = "InferenceModel::run";
    if shapes.len() != g.inputs.len() {
        return Err(Error::invalid(
            OP,
            format!(
                "the model takes {} inputs, got {}",
                g.inputs.len(),
                shapes.len()
            ),
        ));
    }
    let mut n = None;
    for (k, (spec, s)) in g.inputs.iter().zip(shapes).enumerate() {
        if spec.shape.len() != s.len() {
            return Err(Error::shape(
                OP,
                format!(
                    "input {k} has shape {s:?}, the model needs rank {}",
                    spec.shape.len()
                ),
            ));
        }
        for (d, &v) in spec.shape.iter().zip(s) {
            if d.per_batch == 0 {
                continue;
            }
            let rest = v as i128 - d.fixed as i128;
            let per = d.per_batch as i128;
            let b = if rest >= 0 && rest % per == 0 {
                usize::try_from(rest / per).ok()
            } else {
                None
            };
            let Some(b) = b else {
                return Err(Error::shape(
                    OP,
                    format!("input {k} has shape {s:?}, which fits no batch size"),
                ));
            };
            if n.is_some_and(|m| m != b) {
                return Err(Error::shape(
                    OP,
                    format!("inputs disagree on the batch size: {n:?} and {b}"),
                ));
            }
            n = Some(b);
        }
    }
    let n = n.unwrap_or(0);
    for (k, (spec, s)) in g.inputs.iter().zip(shapes).enumerate() {
        let want = spec
            .shape
            .iter()
            .map(|d| d.at(n))
            .collect::<Result<Vec<_>>>()?;
        if want != *s {
            return Err(Error::shape(
                OP,
                format!("input {k} has shape {s:?}, the model needs {want:?}"),
            ));
        }
    }
    Ok(n)
}

/// Makes the plan for `input_shapes`; `cap` is the device's largest buffer.
pub(crate) fn make(g: &Graph, input_shapes: &[Vec<usize>], cap: u64) -> Result<Plan> {
    let n = batch_of(g, input_shapes)?;
    let shapes = g.infer_shapes(input_shapes, n)?;
    let count = g.nodes.len();
    // The node whose buffer each value lives in (views share their operand's), and whether
    // each value is contiguous: a reshape of a strided view copies, so it owns a buffer.
    let mut owner: Vec<usize> = (0..count).collect();
    let mut contiguous = vec![true; count];
    for (i, node) in g.nodes.iter().enumerate() {
        if !is_view(&node.op) {
            continue;
        }
        let (src_owner, src_contiguous, src_shape) = match node.inputs.first() {
            Some(Src::Node(k)) => (owner[*k], contiguous[*k], &shapes[*k][..]),
            // Constants are contiguous; inputs are taken to be (the caller's tensors).
            Some(Src::Input(k)) => (usize::MAX, true, &input_shapes[*k][..]),
            Some(Src::Const(k)) => (usize::MAX, true, g.consts[*k].dims()),
            None => (usize::MAX, true, &[][..]),
        };
        contiguous[i] = match &node.op {
            OpKind::Reshape { .. } => true,
            OpKind::Permute { perm } => {
                src_contiguous && perm.iter().enumerate().all(|(a, &p)| a == p)
            }
            OpKind::Expand { .. } => src_contiguous && shapes[i] == src_shape,
            OpKind::Narrow { axis, .. } => {
                src_contiguous && src_shape.iter().take(*axis).all(|&d| d == 1)
            }
            _ => false,
        };
        let copies = matches!(node.op, OpKind::Reshape { .. }) && !src_contiguous;
        if !copies {
            owner[i] = src_owner;
        }
    }
    let mut last = vec![0usize; count];
    for (i, node) in g.nodes.iter().enumerate() {
        last[i] = last[i].max(i);
        for s in &node.inputs {
            if let Src::Node(k) = s {
                last[*k] = last[*k].max(i);
            }
        }
    }
    for s in &g.outputs {
        if let Src::Node(k) = s {
            last[*k] = usize::MAX;
        }
    }
    let mut frees = vec![Vec::new(); count];
    for (k, &l) in last.iter().enumerate() {
        if l != usize::MAX {
            frees[l].push(k);
        }
    }
    // A buffer dies with the last reader of any value living in it.
    let mut buffer_end = vec![0usize; count];
    for k in 0..count {
        if owner[k] != usize::MAX {
            let o = owner[k];
            buffer_end[o] = buffer_end[o].max(last[k]);
        }
    }
    // Every value must fit one buffer; found here, before any GPU work is recorded.
    for (k, s) in shapes.iter().enumerate() {
        let numel = s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let need = numel.map(|e| g.nodes[k].dtype.storage_bytes(e));
        if owner[k] == k && need.is_none_or(|b| b > cap) {
            return Err(Error::invalid(
                "InferenceModel::run",
                format!(
                    "node {k} ({}) of shape {s:?} needs more than the device's largest buffer of {cap} bytes",
                    g.nodes[k].op.name()
                ),
            ));
        }
    }
    let bytes = |k: usize| {
        let numel: usize = shapes[k].iter().product();
        crate::device::size_class(g.nodes[k].dtype.storage_bytes(numel), cap)
    };
    let mut free_by_class: std::collections::HashMap<u64, usize> = Default::default();
    let (mut allocated, mut total) = (0u64, 0u64);
    let mut ends: Vec<Vec<usize>> = vec![Vec::new(); count];
    for k in 0..count {
        if owner[k] == k && buffer_end[k] != usize::MAX {
            ends[buffer_end[k]].push(k);
        }
    }
    for i in 0..count {
        if owner[i] == i {
            let c = bytes(i);
            total += c;
            match free_by_class.get_mut(&c) {
                Some(f) if *f > 0 => *f -= 1,
                _ => allocated += c,
            }
        }
        for &k in &ends[i] {
            let c = bytes(k);
            *free_by_class.entry(c).or_default() += 1;
        }
    }
    Ok(Plan {
        n,
        shapes,
        frees,
        planned_bytes: allocated,
        activation_bytes: total,
    })
}
