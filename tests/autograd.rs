//! Autograd behaviour: recording only when needed, accumulation, freeing, misuse, readbacks
//! and memory.

mod common;

use common::*;
use kiln::loss::{self, Reduction};
use kiln::{no_grad, Device, Error, NoGradGuard, Tensor};

struct Mlp {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl Mlp {
    fn new(d: &Device) -> Mlp {
        Mlp {
            w1: Tensor::randn(&[32, 20], 1, d)
                .unwrap()
                .mul_scalar(0.2)
                .unwrap()
                .requires_grad(),
            b1: Tensor::zeros(&[32], d).unwrap().requires_grad(),
            w2: Tensor::randn(&[10, 32], 2, d)
                .unwrap()
                .mul_scalar(0.2)
                .unwrap()
                .requires_grad(),
            b2: Tensor::zeros(&[10], d).unwrap().requires_grad(),
        }
    }

    fn loss(&self, x: &Tensor, t: &Tensor) -> Tensor {
        let h = x
            .matmul(&self.w1.t().unwrap())
            .unwrap()
            .add(&self.b1)
            .unwrap()
            .relu()
            .unwrap();
        let logits = h
            .matmul(&self.w2.t().unwrap())
            .unwrap()
            .add(&self.b2)
            .unwrap();
        loss::cross_entropy(&logits, t, &Default::default()).unwrap()
    }

    fn params(&self) -> [&Tensor; 4] {
        [&self.w1, &self.b1, &self.w2, &self.b2]
    }
}

fn batch(d: &Device, seed: u64) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let x = Tensor::from_slice(&rng.vec(16 * 20, -1.0, 1.0), &[16, 20], d).unwrap();
    let t: Vec<f32> = (0..16).map(|_| rng.below(10) as f32).collect();
    (x, Tensor::from_slice(&t, &[16], d).unwrap())
}

#[test]
fn backward_reads_nothing_back() {
    let d = own_device();
    let net = Mlp::new(&d);
    let (x, t) = batch(&d, 1);
    let loss = net.loss(&x, &t);
    let before = d.stats();
    loss.backward().unwrap();
    let after = d.stats();
    assert_eq!(
        after.readbacks, before.readbacks,
        "backward must not read data back"
    );
    assert!(after.dispatches > before.dispatches, "backward ran kernels");
    assert!(
        after.submits - before.submits <= 1,
        "{} submits in backward",
        after.submits - before.submits
    );
    for p in net.params() {
        assert_eq!(p.grad().unwrap().dims(), p.dims());
    }
}

#[test]
fn thousand_training_iterations_keep_memory_flat() {
    let d = own_device();
    let net = Mlp::new(&d);
    let (x, t) = batch(&d, 2);
    let mut live_after_first = 0;
    for i in 0..1000 {
        {
            let loss = net.loss(&x, &t);
            loss.backward().unwrap();
            for p in net.params() {
                assert!(p.grad().is_some());
                p.zero_grad();
            }
        }
        if i == 0 {
            d.synchronize().unwrap();
            live_after_first = d.live_bytes();
        }
    }
    d.synchronize().unwrap();
    assert_eq!(
        d.live_bytes(),
        live_after_first,
        "live bytes grew over 1000 iterations"
    );
    assert!(
        d.stats().readbacks == 0,
        "training without reading the loss reads nothing back"
    );
}

#[test]
fn graph_and_saved_tensors_are_freed_by_backward() {
    let d = own_device();
    let net = Mlp::new(&d);
    let (x, t) = batch(&d, 3);
    d.synchronize().unwrap();
    let base = d.live_bytes();
    let loss = net.loss(&x, &t);
    d.synchronize().unwrap();
    let with_graph = d.live_bytes();
    assert!(with_graph > base, "the graph holds saved activations");
    loss.backward().unwrap();
    assert!(net.params().iter().all(|p| p.grad().is_some()));
    drop(loss);
    for p in net.params() {
        p.zero_grad();
    }
    d.synchronize().unwrap();
    assert_eq!(
        d.live_bytes(),
        base,
        "everything but parameters and inputs was released"
    );
}

#[test]
fn nothing_is_recorded_without_grad() {
    let d = dev();
    let a = Tensor::ones(&[3], &d).unwrap();
    let b = a.exp().unwrap().add(&a).unwrap().sum_all().unwrap();
    assert!(!b.requires_grad_flag());
    assert!(matches!(b.backward(), Err(Error::InvalidArgument { .. })));
    let w = a.clone().requires_grad();
    assert!(w.mul_scalar(2.0).unwrap().requires_grad_flag());
    assert!(
        !w.gt_scalar(0.0).unwrap().requires_grad_flag(),
        "comparisons are not differentiable"
    );
    assert!(!w.argmax(0, false).unwrap().requires_grad_flag());
    assert!(!w.detach().mul_scalar(2.0).unwrap().requires_grad_flag());
    {
        let _g = NoGradGuard::new();
        assert!(!kiln::is_grad_enabled());
        assert!(!w.mul_scalar(2.0).unwrap().requires_grad_flag());
        no_grad(|| assert!(!kiln::is_grad_enabled()));
        assert!(
            !kiln::is_grad_enabled(),
            "nested scopes restore the outer state"
        );
    }
    assert!(kiln::is_grad_enabled());
}

#[test]
fn gradients_accumulate_and_reset() {
    let d = dev();
    let x = Tensor::from_slice(&[1.0, -2.0, 3.0], &[3], &d)
        .unwrap()
        .requires_grad();
    let y = x.mul(&x).unwrap().sum_all().unwrap(); // dy/dx = 2x
    y.backward_with(None, true).unwrap();
    y.backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec().unwrap(), vec![4.0, -8.0, 12.0]);
    // The graph is freed now.
    let e = y.backward().unwrap_err().to_string();
    assert!(e.contains("freed"), "{e}");
    x.zero_grad();
    assert!(x.grad().is_none());
    // A tensor used twice gets both contributions; a detached use gets none.
    let z = x
        .mul_scalar(3.0)
        .unwrap()
        .add(&x.detach().mul_scalar(100.0).unwrap())
        .unwrap()
        .add(&x)
        .unwrap();
    z.sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec().unwrap(), vec![4.0; 3]);
    // Non-leaf tensors keep no gradient (as in PyTorch).
    assert!(z.grad().is_none() && !z.is_leaf() && x.is_leaf());
}

#[test]
fn misuse_is_err() {
    let d = dev();
    let x = Tensor::ones(&[2, 3], &d).unwrap().requires_grad();
    let y = x.mul_scalar(2.0).unwrap();
    let e = y.backward().unwrap_err().to_string();
    assert!(e.contains("one-element") && e.contains("[2, 3]"), "{e}");
    let wrong = Tensor::ones(&[3, 2], &d).unwrap();
    assert!(matches!(
        y.backward_with(Some(&wrong), false),
        Err(Error::Shape { .. })
    ));
    let other = own_device();
    let foreign = Tensor::ones(&[2, 3], &other).unwrap();
    assert!(matches!(
        y.backward_with(Some(&foreign), false),
        Err(Error::DeviceMismatch { .. })
    ));
    assert!(Tensor::ones(&[2], &d).unwrap().grad().is_none());
    assert!(Tensor::ones(&[2], &d).unwrap().set_grad(None).is_err());
    assert!(x.set_grad(Some(Tensor::ones(&[5], &d).unwrap())).is_err());
    // Loss shape checks.
    let logits = Tensor::zeros(&[4, 3], &d).unwrap();
    assert!(loss::cross_entropy(
        &logits,
        &Tensor::zeros(&[3], &d).unwrap(),
        &Default::default()
    )
    .is_err());
    assert!(loss::mse_loss(
        &logits,
        &Tensor::zeros(&[4, 1], &d).unwrap(),
        Reduction::Mean
    )
    .is_err());
    let opts = loss::CrossEntropyOptions {
        label_smoothing: 1.5,
        ..Default::default()
    };
    assert!(loss::cross_entropy(&logits, &Tensor::zeros(&[4], &d).unwrap(), &opts).is_err());
}
