//! Capture: while a forward pass runs with capture on, every tensor op appends a node to the
//! graph of this thread (ops call [`traced`]); tensors that no captured op made become
//! constants. The forward runs at three batch sizes, and sizes that change with the batch
//! become linear in it ([`Dim`]), so the graph runs for any batch size.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::graph::{DType, Dim, Graph, InputSpec, Node, OpKind, Src};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Threads capturing now: when 0, [`traced`] costs one atomic load.
static CAPTURING: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// A tensor's identity during capture: its storage and its layout.
type Key = (usize, usize, Vec<usize>, Vec<usize>);

fn key(t: &Tensor) -> Key {
    (
        Arc::as_ptr(&t.storage) as usize,
        t.layout.offset,
        t.layout.shape.clone(),
        t.layout.strides.clone(),
    )
}

/// One forward pass as recorded.
struct Trace {
    nodes: Vec<(OpKind, Vec<Src>, Vec<usize>)>,
    consts: Vec<Tensor>,
    /// True for constants made inside the forward (not weights that existed before).
    fresh: Vec<bool>,
    outputs: Vec<Src>,
}

struct Recorder {
    first_storage: u64,
    values: HashMap<Key, Src>,
    /// Every tensor seen, so that no storage address is reused during capture.
    keep: Vec<Tensor>,
    trace: Trace,
}

impl Recorder {
    fn resolve(&mut self, t: &Tensor) -> Result<Src> {
        if let Some(&s) = self.values.get(&key(t)) {
            return Ok(s);
        }
        if t.storage.id >= self.first_storage {
            return Err(Error::invalid(
                "freeze",
                format!(
                    "a tensor of shape {:?} was made during the forward pass by an op that cannot be captured",
                    t.dims()
                ),
            ));
        }
        Ok(self.constant(t, false))
    }

    fn constant(&mut self, t: &Tensor, fresh: bool) -> Src {
        let src = Src::Const(self.trace.consts.len());
        // The graph keeps the tensor as it is now; a copy is made when the graph is built, so
        // that later writes to the weights (an optimizer step) do not reach the frozen model.
        self.trace.consts.push(t.detach());
        self.trace.fresh.push(fresh);
        self.values.insert(key(t), src);
        self.keep.push(t.clone());
        src
    }
}

/// True while this thread captures a graph (also inside a traced op's body, where the ops it
/// calls are not recorded as nodes of their own).
pub(crate) fn capturing() -> bool {
    CAPTURING.load(Ordering::Relaxed) > 0 && RECORDER.with(|r| r.borrow().is_some())
}

struct DepthGuard(u32);

impl Drop for DepthGuard {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(self.0));
    }
}

/// Runs the op body `f`; while capturing, and when this op is not called from inside
/// another captured op, appends the node `make(&output)` reading `inputs`.
pub(crate) fn traced(
    inputs: &[&Tensor],
    make: impl FnOnce(&Tensor) -> OpKind,
    f: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    // Every op that computes goes through here: its operands must be f32 (views, which only
    // change the layout, use `traced_view` and keep any element type).
    for t in inputs {
        t.check_float("a tensor op")?;
    }
    traced_view(inputs, make, f)
}

/// [`traced`] for the layout-only ops (views), which take tensors of any element type.
pub(crate) fn traced_view(
    inputs: &[&Tensor],
    make: impl FnOnce(&Tensor) -> OpKind,
    f: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    if !capturing() {
        return f();
    }
    let outer = DEPTH.with(|d| d.replace(d.get() + 1));
    let guard = DepthGuard(outer);
    let out = f();
    drop(guard);
    let out = out?;
    if outer == 0 {
        RECORDER.with(|r| -> Result<()> {
            let mut r = r.borrow_mut();
            let Some(rec) = r.as_mut() else { return Ok(()) };
            let srcs = inputs
                .iter()
                .map(|t| rec.resolve(t))
                .collect::<Result<Vec<_>>>()?;
            let src = Src::Node(rec.trace.nodes.len());
            rec.trace.nodes.push((make(&out), srcs, out.shape()));
            rec.values.insert(key(&out), src);
            rec.keep.push(out.clone());
            Ok(())
        })?;
    }
    Ok(out)
}

/// `out` holds the same values as `input` (a copy to contiguous memory, a detach, dropout in
/// eval mode): no node, the same value.
pub(crate) fn alias(input: &Tensor, out: &Tensor) -> Result<()> {
    if !capturing() || DEPTH.with(Cell::get) > 0 {
        return Ok(());
    }
    RECORDER.with(|r| {
        let mut r = r.borrow_mut();
        let Some(rec) = r.as_mut() else { return Ok(()) };
        let src = rec.resolve(input)?;
        rec.values.insert(key(out), src);
        rec.keep.push(out.clone());
        Ok(())
    })
}

/// `t`, made from host data inside the forward, is a constant of the graph.
pub(crate) fn constant(t: &Tensor) {
    if !capturing() || DEPTH.with(Cell::get) > 0 {
        return;
    }
    RECORDER.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut() {
            rec.constant(t, true);
        }
    });
}

/// `Err` when capturing and `t` depends on the inputs: values read to the host would be
/// frozen into the graph (a size or a branch taken from data) and be wrong for other inputs.
/// Weights may be read.
pub(crate) fn readback(t: &Tensor) -> Result<()> {
    if !capturing() || DEPTH.with(Cell::get) > 0 {
        return Ok(());
    }
    RECORDER.with(|r| {
        let mut r = r.borrow_mut();
        let Some(rec) = r.as_mut() else { return Ok(()) };
        match rec.resolve(t)? {
            Src::Const(_) => Ok(()),
            _ => Err(Error::invalid(
                "to_vec",
                format!(
                    "cannot read a tensor of shape {:?} that depends on the inputs while capturing: its values would be frozen into the graph",
                    t.dims()
                ),
            )),
        }
    })
}

/// `Err` when capturing: `op` (random numbers, an in-place write) has no place in a graph.
pub(crate) fn refuse(op: &'static str, why: &str) -> Result<()> {
    if capturing() {
        return Err(Error::invalid(
            op,
            format!("cannot be captured for inference: {why}"),
        ));
    }
    Ok(())
}

/// Ends capture on this thread when dropped, also on error or panic.
struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        RECORDER.with(|r| r.borrow_mut().take());
        CAPTURING.fetch_sub(1, Ordering::Relaxed);
    }
}

fn trace_once(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>) -> Result<Trace> {
    if RECORDER.with(|r| r.borrow().is_some()) {
        return Err(Error::invalid(
            "freeze",
            "capture is already running on this thread",
        ));
    }
    let mut rec = Recorder {
        first_storage: crate::tensor::next_storage_id(),
        values: HashMap::new(),
        keep: inputs.to_vec(),
        trace: Trace {
            nodes: Vec::new(),
            consts: Vec::new(),
            fresh: Vec::new(),
            outputs: Vec::new(),
        },
    };
    for (k, t) in inputs.iter().enumerate() {
        if let Some(Src::Input(j)) = rec.values.insert(key(t), Src::Input(k)) {
            return Err(Error::invalid(
                "freeze",
                format!("inputs {j} and {k} are the same tensor; pass a copy for each input"),
            ));
        }
    }
    RECORDER.with(|r| *r.borrow_mut() = Some(rec));
    CAPTURING.fetch_add(1, Ordering::Relaxed);
    let guard = CaptureGuard;
    let outputs = crate::autograd::no_grad(|| f(inputs))?;
    let mut rec = RECORDER
        .with(|r| r.borrow_mut().take())
        .ok_or_else(|| Error::invalid("freeze", "internal: the capture was lost"))?;
    drop(guard);
    if outputs.is_empty() {
        return Err(Error::invalid("freeze", "the forward returned no tensor"));
    }
    for o in &outputs {
        let src = rec.resolve(o)?;
        rec.trace.outputs.push(src);
    }
    Ok(rec.trace)
}

/// Captures `f` on `inputs`, with `batch_axes[k]` the batch axis of input `k` (`None`: no
/// batch axis). The forward runs at the example batch size `B` and at `B + 1` and `B + 2`;
/// the three graphs must agree up to sizes linear in the batch.
pub(crate) fn capture(
    inputs: &[Tensor],
    batch_axes: &[Option<usize>],
    f: &dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<Graph> {
    const OP: &str = "freeze";
    if batch_axes.len() != inputs.len() {
        return Err(Error::invalid(
            OP,
            format!(
                "{} batch axes for {} inputs",
                batch_axes.len(),
                inputs.len()
            ),
        ));
    }
    let mut batch = None;
    for (t, axis) in inputs.iter().zip(batch_axes) {
        let Some(a) = *axis else { continue };
        let size = *t.dims().get(a).ok_or_else(|| {
            Error::invalid(
                OP,
                format!(
                    "batch axis {a} is out of range for an input of shape {:?}",
                    t.dims()
                ),
            )
        })?;
        if batch.is_some_and(|b| b != size) {
            return Err(Error::shape(
                OP,
                format!("inputs disagree on the batch size: {batch:?} and {size}"),
            ));
        }
        batch = Some(size);
    }
    if batch == Some(0) {
        return Err(Error::shape(OP, "the example batch is empty"));
    }
    let sizes: Vec<usize> = match batch {
        Some(b) => vec![b, b + 1, b + 2],
        None => vec![0],
    };
    let mut traces = Vec::new();
    for &size in &sizes {
        let ins = inputs
            .iter()
            .zip(batch_axes)
            .map(|(t, axis)| match (*axis, batch) {
                (Some(a), Some(b)) if size != b => {
                    let rows: Vec<usize> = (0..size).map(|j| j % b).collect();
                    t.detach().index_select_slice(a as isize, &rows)
                }
                _ => Ok(t.detach()),
            })
            .collect::<Result<Vec<_>>>()?;
        traces.push(trace_once(&ins, f)?);
    }
    merge(inputs, batch_axes, &sizes, traces)
}

/// `a * N + b` through `(n0, v0)` and `(n1, v1)`, checked at every other point.
fn linear_fit(sizes: &[usize], values: &[usize], what: &dyn Fn() -> String) -> Result<Dim> {
    if sizes.len() == 1 {
        return Ok(Dim::fixed(values[0]));
    }
    let a = values[1] as i64 - values[0] as i64;
    let b = values[0] as i64 - a * sizes[0] as i64;
    for (&n, &v) in sizes.iter().zip(values) {
        if a * n as i64 + b != v as i64 {
            return Err(Error::invalid(
                "freeze",
                format!(
                    "{} is {values:?} at batch sizes {sizes:?}: not linear in the batch size",
                    what()
                ),
            ));
        }
    }
    Ok(Dim {
        per_batch: a,
        fixed: b,
    })
}

fn merge(
    inputs: &[Tensor],
    batch_axes: &[Option<usize>],
    sizes: &[usize],
    mut traces: Vec<Trace>,
) -> Result<Graph> {
    const OP: &str = "freeze";
    let differs = |what: String| {
        Err(Error::invalid(
            OP,
            format!("the forward pass records a different graph at another batch size ({what}); data-dependent control flow cannot be captured"),
        ))
    };
    let first = traces.remove(0);
    for t in &traces {
        if t.nodes.len() != first.nodes.len()
            || t.consts.len() != first.consts.len()
            || t.outputs != first.outputs
        {
            return differs(format!(
                "{} against {} nodes",
                t.nodes.len(),
                first.nodes.len()
            ));
        }
        for (k, (a, b)) in first.consts.iter().zip(&t.consts).enumerate() {
            if a.shares_storage(b) && a.layout() == b.layout() {
                continue;
            }
            if !(first.fresh[k] && t.fresh[k]) || a.dims() != b.dims() {
                return differs(format!(
                    "constant {k} of shape {:?} against {:?}: a tensor made in the forward must not depend on the batch size",
                    a.dims(),
                    b.dims()
                ));
            }
            if a.to_vec()? != b.to_vec()? {
                return differs(format!(
                    "constant {k} of shape {:?} has other values",
                    a.dims()
                ));
            }
        }
    }
    let zeroed = |op: &OpKind| {
        let mut op = op.clone();
        for d in op.dims_mut() {
            *d = Dim::fixed(0);
        }
        op
    };
    let mut nodes = Vec::with_capacity(first.nodes.len());
    for (i, (op, srcs, shape)) in first.nodes.iter().enumerate() {
        let mut op = op.clone();
        for t in &traces {
            let (op2, srcs2, shape2) = &t.nodes[i];
            if zeroed(&op) != zeroed(op2) || srcs != srcs2 || shape.len() != shape2.len() {
                return differs(format!("node {i} is {} against {}", op.name(), op2.name()));
            }
        }
        let mut others: Vec<OpKind> = traces.iter().map(|t| t.nodes[i].0.clone()).collect();
        let name = op.name();
        let mut other_dims: Vec<Vec<&mut Dim>> = others.iter_mut().map(|o| o.dims_mut()).collect();
        for (j, d) in op.dims_mut().into_iter().enumerate() {
            let mut values = vec![d.fixed as usize];
            values.extend(other_dims.iter_mut().map(|o| o[j].fixed as usize));
            *d = linear_fit(sizes, &values, &|| {
                format!("attribute {j} of node {i} ({name})")
            })?;
        }
        let mut dims = Vec::with_capacity(shape.len());
        for (j, &s) in shape.iter().enumerate() {
            let mut values = vec![s];
            values.extend(traces.iter().map(|t| t.nodes[i].2[j]));
            dims.push(linear_fit(sizes, &values, &|| {
                format!("axis {j} of the output of node {i} ({name})")
            })?);
        }
        nodes.push(Node {
            op,
            inputs: srcs.clone(),
            shape: dims,
            dtype: DType::F32,
        });
    }
    let input_specs = inputs
        .iter()
        .zip(batch_axes)
        .map(|(t, axis)| InputSpec {
            shape: t
                .dims()
                .iter()
                .enumerate()
                .map(|(a, &d)| {
                    if Some(a) == *axis {
                        Dim {
                            per_batch: 1,
                            fixed: 0,
                        }
                    } else {
                        Dim::fixed(d)
                    }
                })
                .collect(),
        })
        .collect();
    let const_dtypes = vec![DType::F32; first.consts.len()];
    // Storage of the graph's own: the weights may go on changing (an optimizer that still
    // holds them, an `assign`) without reaching the frozen model.
    let consts = crate::autograd::no_grad(|| {
        first
            .consts
            .iter()
            .map(crate::ops::elementwise::copy)
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(Graph {
        inputs: input_specs,
        consts,
        const_dtypes,
        nodes,
        outputs: first.outputs,
    })
}
