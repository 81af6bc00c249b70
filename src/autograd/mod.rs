//! Reverse-mode automatic differentiation.
//!
//! A tensor takes part in the graph when it is a leaf that requires a gradient
//! ([`Tensor::requires_grad`]) or the result of an op with such an input; every other tensor
//! carries no node, so code without gradients pays nothing. Each recorded node holds the
//! [`Op`] with what its backward rule needs and edges to the nodes of its inputs.
//! [`Tensor::backward`] walks the graph in reverse topological order, runs each rule (GPU ops
//! only: nothing is read back), accumulates gradients into the leaves, and frees the graph.
//!
//! All the calculus lives in [`backward.rs`](self::backward).

mod backward;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) use backward::Op;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

static NEXT_NODE: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// True unless inside [`no_grad`] on this thread.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Runs `f` without recording any graph (as `torch.no_grad()`): results do not require grad.
///
/// ```
/// # let dev = kiln::Device::default_device()?;
/// let w = kiln::Tensor::ones(&[3], &dev)?.requires_grad();
/// let y = kiln::no_grad(|| w.mul_scalar(2.0))?;
/// assert!(!y.requires_grad_flag());
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Disables graph recording on this thread until dropped; nests.
pub struct NoGradGuard {
    previous: bool,
}

impl NoGradGuard {
    /// Starts a no-grad region.
    pub fn new() -> Self {
        let previous = GRAD_ENABLED.with(|g| g.replace(false));
        NoGradGuard { previous }
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// Called with a leaf's node id and its final gradient during backward.
type LeafReady<'a> = &'a mut dyn FnMut(u64, &Tensor) -> Result<()>;

/// The op that produced a node, and the nodes of its inputs (`None` for inputs that need no
/// gradient). Taken out when the graph is freed.
struct Recorded {
    op: Op,
    inputs: Vec<Option<Arc<Node>>>,
    /// The versions of `op.saved()` when recorded.
    versions: Vec<u64>,
}

/// A tensor's place in the graph.
pub(crate) struct Node {
    id: u64,
    /// Leaves hold their accumulated gradient.
    leaf: bool,
    grad: Mutex<Option<Tensor>>,
    recorded: Mutex<Option<Recorded>>,
    freed: AtomicBool,
}

/// Takes a node's record out, also from a poisoned lock.
fn take_recorded(m: &mut Mutex<Option<Recorded>>) -> Option<Recorded> {
    match m.get_mut() {
        Ok(r) => r.take(),
        Err(p) => p.into_inner().take(),
    }
}

/// Graphs are freed iteratively: a chain of 100k views or 40k accumulated losses would
/// overflow the stack if each node dropped its inputs recursively.
impl Drop for Node {
    fn drop(&mut self) {
        let Some(rec) = take_recorded(&mut self.recorded) else {
            return;
        };
        let mut stack: Vec<Arc<Node>> = rec.inputs.into_iter().flatten().collect();
        drop(rec.op);
        while let Some(n) = stack.pop() {
            // Only the last owner of a node frees it; its inputs go on the stack, and its own
            // drop then finds nothing left to free.
            if let Some(mut node) = Arc::into_inner(n) {
                if let Some(r) = take_recorded(&mut node.recorded) {
                    stack.extend(r.inputs.into_iter().flatten());
                }
            }
        }
    }
}

impl Node {
    fn new(leaf: bool, recorded: Option<Recorded>) -> Arc<Node> {
        Arc::new(Node {
            id: NEXT_NODE.fetch_add(1, Ordering::Relaxed),
            leaf,
            grad: Mutex::new(None),
            recorded: Mutex::new(recorded),
            freed: AtomicBool::new(false),
        })
    }

    fn input_nodes(&self) -> Result<Vec<Arc<Node>>> {
        if self.leaf {
            return Ok(Vec::new());
        }
        match &*lock(&self.recorded) {
            Some(r) => Ok(r.inputs.iter().flatten().cloned().collect()),
            None => Err(graph_freed()),
        }
    }
}

fn graph_freed() -> Error {
    Error::invalid(
        "backward",
        "the graph was already freed by an earlier backward; pass retain_graph = true to the first call to backward through it again",
    )
}

/// Attaches a graph node to `out` when grad mode is on and some input requires grad.
/// `make` builds the op (with what its backward rule saves) only in that case.
pub(crate) fn record(out: Tensor, inputs: &[&Tensor], make: impl FnOnce(&Tensor) -> Op) -> Tensor {
    if !is_grad_enabled() || inputs.iter().all(|t| t.node.is_none()) {
        return out;
    }
    let op = make(&out);
    let inputs = inputs.iter().map(|t| t.node.clone()).collect();
    let versions = op.saved().iter().map(|t| t.version()).collect();
    let node = Node::new(
        false,
        Some(Recorded {
            op,
            inputs,
            versions,
        }),
    );
    Tensor {
        node: Some(node),
        ..out
    }
}

impl Tensor {
    /// This tensor as a leaf that requires a gradient (a parameter). Shares the data.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let w = kiln::Tensor::from_slice(&[1.0, 2.0, 3.0], &[3], &dev)?.requires_grad();
    /// let loss = w.mul(&w)?.sum_all()?; // sum of squares
    /// loss.backward()?;
    /// assert_eq!(w.grad().unwrap().to_vec()?, vec![2.0, 4.0, 6.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn requires_grad(self) -> Tensor {
        Tensor {
            node: Some(Node::new(true, None)),
            ..self
        }
    }

    /// True when gradients flow to or through this tensor.
    pub fn requires_grad_flag(&self) -> bool {
        self.node.is_some()
    }

    /// True for a tensor that requires grad and was not produced by a recorded op.
    pub fn is_leaf(&self) -> bool {
        self.node.as_ref().is_none_or(|n| n.leaf)
    }

    /// The same data without a graph node: no gradient flows through the result.
    pub fn detach(&self) -> Tensor {
        Tensor {
            node: None,
            ..self.clone()
        }
    }

    /// The gradient accumulated in a leaf by [`Tensor::backward`]; `None` before any backward,
    /// for tensors that do not require grad, and for non-leaf tensors (as in PyTorch).
    pub fn grad(&self) -> Option<Tensor> {
        self.node
            .as_ref()
            .filter(|n| n.leaf)
            .and_then(|n| lock(&n.grad).clone())
    }

    /// Clears the accumulated gradient of a leaf.
    pub fn zero_grad(&self) {
        if let Some(n) = &self.node {
            *lock(&n.grad) = None;
        }
    }

    /// Replaces the accumulated gradient of a leaf (used by optimizers and tests).
    pub fn set_grad(&self, grad: Option<Tensor>) -> Result<()> {
        let node = self.node.as_ref().filter(|n| n.leaf).ok_or_else(|| {
            Error::invalid(
                "set_grad",
                "only a leaf that requires grad holds a gradient",
            )
        })?;
        if let Some(g) = &grad {
            self.check_device("set_grad", g)?;
            g.check_float("set_grad")?;
            if g.dims() != self.dims() {
                return Err(Error::shape(
                    "set_grad",
                    format!(
                        "gradient shape {:?} differs from tensor shape {:?}",
                        g.dims(),
                        self.dims()
                    ),
                ));
            }
        }
        *lock(&node.grad) = grad.map(|g| g.detach());
        Ok(())
    }

    /// Backpropagates from this one-element tensor (a loss): gradients accumulate into every
    /// leaf that requires grad, and the graph is freed.
    pub fn backward(&self) -> Result<()> {
        self.backward_with(None, false)
    }

    /// Backpropagates with an explicit gradient of this tensor (`None`: ones, allowed only for
    /// one element). With `retain_graph`, the graph is kept for another backward.
    ///
    /// ```
    /// # let dev = kiln::Device::default_device()?;
    /// let x = kiln::Tensor::from_slice(&[1.0, 2.0], &[2], &dev)?.requires_grad();
    /// let y = x.mul_scalar(3.0)?;
    /// let dy = kiln::Tensor::from_slice(&[1.0, 10.0], &[2], &dev)?;
    /// y.backward_with(Some(&dy), true)?;
    /// y.backward_with(Some(&dy), false)?; // gradients accumulate
    /// assert_eq!(x.grad().unwrap().to_vec()?, vec![6.0, 60.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn backward_with(&self, grad: Option<&Tensor>, retain_graph: bool) -> Result<()> {
        self.backward_inner(grad, retain_graph, None)
    }

    /// [`Tensor::backward`] that calls `ready(leaf, gradient)` as soon as a leaf's gradient is
    /// final, while the rest of the graph is still to run (data-parallel training starts each
    /// gradient bucket's copy from there). `leaf` is [`Tensor::node_id`] of the leaf.
    pub(crate) fn backward_hooked(&self, ready: LeafReady<'_>) -> Result<()> {
        self.backward_inner(None, false, Some(ready))
    }

    /// The identity of this tensor's graph node (`None` without one): a parameter keeps it
    /// for its whole life.
    pub(crate) fn node_id(&self) -> Option<u64> {
        self.node.as_ref().map(|n| n.id)
    }

    fn backward_inner(
        &self,
        grad: Option<&Tensor>,
        retain_graph: bool,
        mut ready: Option<LeafReady<'_>>,
    ) -> Result<()> {
        const OP: &str = "backward";
        let root = self.node.clone().ok_or_else(|| {
            Error::invalid(OP, "the tensor does not require grad and has no graph")
        })?;
        let seed = match grad {
            Some(g) => {
                self.check_device(OP, g)?;
                if g.dims() != self.dims() {
                    return Err(Error::shape(
                        OP,
                        format!(
                            "gradient shape {:?} differs from tensor shape {:?}",
                            g.dims(),
                            self.dims()
                        ),
                    ));
                }
                g.detach()
            }
            None => {
                if self.numel() != 1 {
                    return Err(Error::shape(
                        OP,
                        format!(
                            "backward without a gradient needs a one-element tensor, got shape {:?}",
                            self.dims()
                        ),
                    ));
                }
                Tensor::ones(self.dims(), self.device())?
            }
        };
        let _no_grad = NoGradGuard::new();
        let order = topological_order(&root)?;
        let mut grads: HashMap<u64, Tensor> = HashMap::new();
        grads.insert(root.id, seed);
        for node in order {
            let Some(g) = grads.remove(&node.id) else {
                continue;
            };
            if node.leaf {
                let mut slot = lock(&node.grad);
                let total = match slot.take() {
                    Some(prev) => prev.add(&g)?,
                    None => g.contiguous()?,
                };
                // Topological order visits a leaf after every node that feeds it.
                if let Some(f) = ready.as_mut() {
                    f(node.id, &total)?;
                }
                *slot = Some(total);
                continue;
            }
            let mut guard = lock(&node.recorded);
            let recorded = guard.as_ref().ok_or_else(graph_freed)?;
            let needs: Vec<bool> = recorded.inputs.iter().map(Option::is_some).collect();
            let saved = recorded.op.saved();
            if let Some(t) = saved
                .iter()
                .zip(&recorded.versions)
                .find(|(t, &v)| t.version() != v)
            {
                return Err(Error::invalid(
                    "backward",
                    format!(
                        "a tensor of shape {:?} that the forward saved was modified in place (assign or an optimizer step) before backward; run the forward again",
                        t.0.dims()
                    ),
                ));
            }
            let input_grads = recorded.op.backward(&g, &needs)?;
            for (input, ig) in recorded.inputs.iter().zip(input_grads) {
                let (Some(input), Some(ig)) = (input, ig) else {
                    continue;
                };
                let total = match grads.remove(&input.id) {
                    Some(prev) => prev.add(&ig)?,
                    None => ig,
                };
                grads.insert(input.id, total);
            }
            if !retain_graph {
                *guard = None;
                node.freed.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Nodes reachable from `root`, each before all of its inputs.
fn topological_order(root: &Arc<Node>) -> Result<Vec<Arc<Node>>> {
    if root.freed.load(Ordering::Relaxed) {
        return Err(graph_freed());
    }
    let mut order = Vec::new();
    let mut visited = std::collections::HashSet::new();
    // Iterative post-order DFS: deep graphs must not overflow the stack.
    let mut stack: Vec<(Arc<Node>, bool)> = vec![(root.clone(), false)];
    while let Some((node, expanded)) = stack.pop() {
        if expanded {
            order.push(node);
            continue;
        }
        if !visited.insert(node.id) {
            continue;
        }
        let inputs = node.input_nodes()?;
        stack.push((node, true));
        for input in inputs {
            if !visited.contains(&input.id) {
                stack.push((input, false));
            }
        }
    }
    order.reverse();
    Ok(order)
}
