//! In-process data parallelism on two devices of one adapter: 20 steps of the digits CNN with
//! a global batch of 64 (32 per replica) match one process with batch 64 on the same data
//! order; uneven and empty slices are weighted exactly; bad input is an `Err` that changes
//! nothing; and ranks joined by a communicator check their models and fail together.

mod common;

use std::sync::{Arc, Barrier, Mutex};

use common::ddp::{self, CNN, GLOBAL_BATCH, SHUFFLE_SEED, STEPS};
use common::own_device;
use kiln::data::Dataset;
use kiln::data::{Batch, DataLoader};
use kiln::dist::{Communicator, DataParallel, DataParallelOptions};
use kiln::nn::{Module, Sequential};
use kiln::optim::{Optimizer, Sgd};
use kiln::{Device, Error, Result, Tensor};

fn two_devices() -> Vec<Device> {
    vec![own_device(), own_device()]
}

/// Small buckets, so that the CNN's gradients travel in several.
fn options() -> DataParallelOptions {
    DataParallelOptions {
        bucket_bytes: 16 << 10,
        ..Default::default()
    }
}

fn cnn_dp(devices: &[Device]) -> DataParallel<Sequential, Sgd> {
    DataParallel::new(
        devices,
        |init| Sequential::from_spec(init, CNN),
        ddp::sgd,
        options(),
    )
    .unwrap()
}

#[test]
fn two_replicas_match_one_process_with_the_global_batch() {
    let expected = ddp::reference(&own_device()).unwrap();
    let devices = two_devices();
    let mut dp = cnn_dp(&devices);
    assert!(dp.buckets().len() >= 3, "buckets {:?}", dp.buckets());
    let set = ddp::train_set().unwrap();
    let loaders = dp
        .loaders(|d| DataLoader::new(&set, GLOBAL_BATCH, d).shuffle(SHUFFLE_SEED))
        .unwrap();
    let mut epochs: Vec<_> = loaders.iter().map(|l| l.epoch(0)).collect();
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let shards: Vec<Batch> = epochs
            .iter_mut()
            .map(|e| e.next().unwrap().unwrap())
            .collect();
        assert_eq!([shards[0].len, shards[1].len], [32, 32]);
        losses.push(dp.step(&shards, None).unwrap());
    }
    let replica0 = ddp::parameters(dp.model()).unwrap();
    let replica1 = ddp::parameters(dp.replica(1).unwrap()).unwrap();
    assert_eq!(replica0, replica1, "the replicas drifted apart");
    let (dl, dp_) = ddp::compare(&losses, &replica0, &expected).unwrap();
    println!("largest relative deviation: loss {dl:e}, parameters {dp_:e}");
    let s = dp.stats();
    assert_eq!(s.steps, STEPS as u64);
    assert_eq!(s.reduced_bytes_per_step, 0, "no other process");
    // Every bucket's copy started from within the backward pass.
    assert_eq!(
        s.buckets_started_in_backward,
        (STEPS * 2 * dp.buckets().len()) as u64
    );
}

fn running_mean(m: &Sequential) -> Vec<f32> {
    let state = m.state_dict();
    let (_, t, _) = state
        .iter()
        .find(|(n, _, _)| n.ends_with("running_mean"))
        .unwrap();
    t.to_vec().unwrap()
}

#[test]
fn buffers_follow_replica_0_unless_told_otherwise() {
    for broadcast in [true, false] {
        let devices = two_devices();
        let mut dp = DataParallel::new(
            &devices,
            |init| {
                Sequential::from_spec(
                    init,
                    "flatten linear(64,16) batchnorm1d(16) relu linear(16,10)",
                )
            },
            ddp::sgd,
            DataParallelOptions {
                broadcast_buffers: broadcast,
                ..options()
            },
        )
        .unwrap();
        // Different slices give the replicas different batch statistics.
        let shards = [
            slice(&first_samples(&devices[0], 16), 0, 8),
            slice(&first_samples(&devices[1], 16), 8, 16),
        ];
        dp.step(&shards, None).unwrap();
        let (a, b) = (
            running_mean(dp.model()),
            running_mean(dp.replica(1).unwrap()),
        );
        assert_eq!(
            a == b,
            broadcast,
            "broadcast_buffers {broadcast}: {a:?} against {b:?}"
        );
    }
}

/// SGD whose `step` fails at a given step count.
struct FailingSgd {
    inner: Sgd,
    fail_at: Option<u64>,
}

impl Optimizer for FailingSgd {
    fn step(&mut self) -> Result<()> {
        if Some(self.inner.steps()) == self.fail_at {
            return Err(Error::Gpu("out of memory, say".into()));
        }
        self.inner.step()
    }
    fn params(&self) -> &[Tensor] {
        self.inner.params()
    }
    fn lr(&self) -> f32 {
        self.inner.lr()
    }
    fn set_lr(&mut self, lr: f32) {
        self.inner.set_lr(lr)
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        self.inner.state()
    }
    fn steps(&self) -> u64 {
        self.inner.steps()
    }
    fn set_steps(&mut self, steps: u64) {
        self.inner.set_steps(steps)
    }
    fn set_state(&mut self, name: &str, value: &Tensor) -> Result<()> {
        self.inner.set_state(name, value)
    }
}

#[test]
fn a_failed_optimizer_step_stops_training_on_every_replica() {
    let devices = two_devices();
    let built = Mutex::new(0);
    let mut dp = DataParallel::new(
        &devices,
        |init| Sequential::from_spec(init, CNN),
        |params| {
            let mut n = built.lock().unwrap();
            *n += 1;
            // Replica 1's second step fails.
            let fail_at = (*n == 2).then_some(1);
            Ok(FailingSgd {
                inner: ddp::sgd(params)?,
                fail_at,
            })
        },
        options(),
    )
    .unwrap();
    let shards = || [first_samples(&devices[0], 8), first_samples(&devices[1], 8)];
    dp.step(&shards(), None).unwrap();
    let e = dp.step(&shards(), None).unwrap_err().to_string();
    assert!(
        e.contains("replica 1 failed after the gradients were averaged"),
        "{e}"
    );
    let e = dp.step(&shards(), None).unwrap_err().to_string();
    assert!(e.contains("an earlier step failed"), "{e}");
}

#[test]
fn train_epoch_runs_the_sharded_loaders() {
    let devices = two_devices();
    let mut dp = cnn_dp(&devices);
    let set = ddp::train_set().unwrap();
    let loaders = dp
        .loaders(|d| DataLoader::new(&set, 256, d).shuffle(3))
        .unwrap();
    let losses = dp.train_epoch(&loaders, 0, None).unwrap();
    assert_eq!(losses.len(), set.len().div_ceil(256));
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses.last() < losses.first(), "{losses:?}");
}

/// A batch of the first `n` training samples on `dev`.
fn first_samples(dev: &Device, n: usize) -> Batch {
    let set = ddp::train_set().unwrap();
    let mut b = DataLoader::new(&set, n, dev)
        .epoch(0)
        .next()
        .unwrap()
        .unwrap();
    b.len = n;
    b
}

fn slice(b: &Batch, start: usize, end: usize) -> Batch {
    Batch {
        inputs: b
            .inputs
            .narrow(0, start, end - start)
            .unwrap()
            .contiguous()
            .unwrap(),
        targets: b
            .targets
            .narrow(0, start, end - start)
            .unwrap()
            .contiguous()
            .unwrap(),
        labels: b.labels[start..end].to_vec(),
        len: end - start,
    }
}

/// One step of one process on `n` samples: the parameters after it.
fn one_step_reference(n: usize) -> Vec<(String, Vec<f32>)> {
    let d = own_device();
    let mut dp = cnn_dp(std::slice::from_ref(&d));
    dp.step(&[first_samples(&d, n)], None).unwrap();
    ddp::parameters(dp.model()).unwrap()
}

#[test]
fn uneven_and_empty_slices_are_weighted_by_their_samples() {
    let expected = one_step_reference(40);
    for (a, b) in [(29, 11), (40, 0), (0, 40)] {
        let devices = two_devices();
        let mut dp = cnn_dp(&devices);
        let shards = [
            slice(&first_samples(&devices[0], 40), 0, a),
            slice(&first_samples(&devices[1], 40), a, a + b),
        ];
        dp.step(&shards, None).unwrap();
        let got = ddp::parameters(dp.model()).unwrap();
        for ((name, x), (_, y)) in got.iter().zip(&expected) {
            let worst = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5, "split {a}+{b}: {name} off by {worst}");
        }
    }
}

#[test]
fn bad_input_is_an_err_that_changes_nothing() {
    let devices = two_devices();
    let mut dp = cnn_dp(&devices);
    let before = ddp::parameters(dp.model()).unwrap();
    let b0 = first_samples(&devices[0], 8);
    let b1 = first_samples(&devices[1], 8);

    let e = dp.step(std::slice::from_ref(&b0), None).unwrap_err();
    assert!(e.to_string().contains("1 slices for 2 replicas"), "{e}");

    let e = dp.step(
        &[first_samples(&devices[0], 8), first_samples(&devices[0], 8)],
        None,
    );
    assert!(matches!(e, Err(Error::DeviceMismatch { .. })), "{e:?}");

    let nan = |y: &Tensor, t: &Tensor| -> Result<Tensor> {
        kiln::loss::cross_entropy(y, t, &Default::default())?.mul_scalar(f32::NAN)
    };
    let e = dp
        .step(&[first_samples(&devices[0], 8), b1], Some(&nan))
        .unwrap_err();
    assert!(e.to_string().contains("the loss is NaN"), "{e}");

    let per_sample = |y: &Tensor, _: &Tensor| -> Result<Tensor> { y.sum(&[1], false) };
    let e = dp
        .step(&[b0, first_samples(&devices[1], 8)], Some(&per_sample))
        .unwrap_err();
    assert!(e.to_string().contains("one element"), "{e}");

    assert_eq!(ddp::parameters(dp.model()).unwrap(), before);
    assert_eq!(ddp::parameters(dp.replica(1).unwrap()).unwrap(), before);
    // And the wrapper still trains.
    let shards = [first_samples(&devices[0], 8), first_samples(&devices[1], 8)];
    assert!(dp.step(&shards, None).unwrap().is_finite());
}

#[test]
fn replicas_that_build_different_models_are_refused() {
    let devices = two_devices();
    let calls = Mutex::new(0);
    let r = DataParallel::new(
        &devices,
        |init| {
            let mut c = calls.lock().unwrap();
            *c += 1;
            let width = if *c == 1 { 64 } else { 65 };
            Sequential::from_spec(
                init,
                &format!("flatten linear(64,{width}) relu linear({width},10)"),
            )
        },
        ddp::sgd,
        options(),
    );
    let e = r.err().expect("different replicas were accepted");
    assert!(e.to_string().contains("replica 1's model differs"), "{e}");
}

/// Ranks as threads of this process: the collectives meet at a barrier.
struct ThreadComm {
    rank: usize,
    shared: Arc<(Mutex<Vec<Vec<f32>>>, Barrier)>,
}

fn thread_comms(size: usize) -> Vec<ThreadComm> {
    let shared = Arc::new((Mutex::new(vec![Vec::new(); size]), Barrier::new(size)));
    (0..size)
        .map(|rank| ThreadComm {
            rank,
            shared: shared.clone(),
        })
        .collect()
}

impl ThreadComm {
    /// Every rank posts its data, then each combines them all.
    fn exchange(&mut self, data: &mut [f32], combine: impl Fn(&[Vec<f32>], &mut [f32])) {
        let (slots, barrier) = &*self.shared;
        slots.lock().unwrap()[self.rank] = data.to_vec();
        barrier.wait();
        combine(&slots.lock().unwrap(), data);
        barrier.wait();
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.0.lock().unwrap().len()
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.exchange(data, |all, out| {
            for (i, v) in out.iter_mut().enumerate() {
                *v = all.iter().map(|d| d[i]).sum();
            }
        });
        Ok(())
    }
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        self.exchange(data, |all, out| out.copy_from_slice(&all[root]));
        Ok(())
    }
}

/// Runs `f(rank, comm)` on one thread per rank and returns the results in rank order.
fn on_ranks<T: Send>(size: usize, f: impl Fn(usize, ThreadComm) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = thread_comms(size)
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_ranks_of_one_replica_match_one_process() {
    let expected = ddp::reference(&own_device()).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-dist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let set = ddp::train_set().unwrap();
    let results = on_ranks(2, |_, comm| {
        let d = own_device();
        // Each rank seeds differently: the broadcast of rank 0's model makes them equal.
        let opts = DataParallelOptions {
            seed: comm.rank as u64 * 7,
            ..options()
        };
        let mut dp = DataParallel::with_communicator(
            Box::new(comm),
            std::slice::from_ref(&d),
            |init| Sequential::from_spec(init, CNN),
            ddp::sgd,
            opts,
        )
        .unwrap();
        let loaders = dp
            .loaders(|d| DataLoader::new(&set, GLOBAL_BATCH, d).shuffle(SHUFFLE_SEED))
            .unwrap();
        let mut losses = Vec::new();
        for batch in loaders[0].epoch(0).take(STEPS) {
            losses.push(dp.step(&[batch.unwrap()], None).unwrap());
        }
        let path = dir.join(format!("rank{}.safetensors", dp.rank()));
        let wrote = dp.save_checkpoint(&path, Some(CNN)).unwrap();
        assert_eq!((wrote, path.exists()), (dp.rank() == 0, dp.rank() == 0));
        (losses, ddp::parameters(dp.model()).unwrap(), dp.stats())
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(results[0].0, results[1].0, "the ranks saw different losses");
    assert_eq!(results[0].1, results[1].1, "the ranks drifted apart");
    ddp::compare(&results[0].0, &results[0].1, &expected).unwrap();
    let params: u64 = expected.1.iter().map(|(_, v)| v.len() as u64).sum();
    let s = &results[0].2;
    assert_eq!(
        s.reduced_bytes_per_step,
        4 * (params + expected.1.len() as u64 + s.buckets as u64 + 3 + 1)
    );
}

#[test]
fn ranks_with_different_models_all_get_an_err() {
    let errors = on_ranks(3, |rank, comm| {
        let d = own_device();
        let spec = if rank == 2 {
            "flatten linear(64,10)"
        } else {
            "flatten linear(64,8) relu linear(8,10)"
        };
        ranked(comm, &d, spec).err().map(|e| e.to_string())
    });
    let errors: Vec<String> = errors.into_iter().map(|e| e.expect("no Err")).collect();
    assert!(
        errors[0].contains(
            "1 rank(s) could not build their replicas or have a model that differs from rank 0's"
        ),
        "{}",
        errors[0]
    );
    assert!(
        errors[2].contains("rank 2 has 1 replicas of a model with 2 parameter tensors of 650"),
        "{}",
        errors[2]
    );
}

#[test]
fn a_rank_that_fails_makes_every_rank_err() {
    let results = on_ranks(2, |rank, comm| {
        let d = own_device();
        let mut dp = ranked(comm, &d, CNN).unwrap();
        let before = ddp::parameters(dp.model()).unwrap();
        let ok = dp.step(&[first_samples(&d, 8)], None).map(|_| ());
        // Rank 1's second slice has 7 targets for 8 samples.
        let mut bad = first_samples(&d, 8);
        if rank == 1 {
            bad.targets = Tensor::zeros(&[7], &d).unwrap();
        }
        let after_first = ddp::parameters(dp.model()).unwrap();
        let failed = dp.step(&[bad], None).map(|_| ());
        let unchanged = ddp::parameters(dp.model()).unwrap() == after_first;
        (ok, failed, unchanged, before != after_first)
    });
    for (rank, (ok, failed, unchanged, trained)) in results.into_iter().enumerate() {
        ok.unwrap();
        assert!(trained, "rank {rank}: the first step changed nothing");
        let e = failed.expect_err("the failing step succeeded");
        if rank == 0 {
            assert!(matches!(e, Error::Communication { .. }), "rank 0: {e}");
            assert!(e.to_string().contains("1 other rank(s) failed"), "{e}");
        }
        assert!(
            unchanged,
            "rank {rank}: a failed step changed the parameters"
        );
    }
}

/// One replica of `spec` on `d`, joined by `comm`.
fn ranked(comm: ThreadComm, d: &Device, spec: &str) -> Result<DataParallel<Sequential, Sgd>> {
    DataParallel::with_communicator(
        Box::new(comm),
        std::slice::from_ref(d),
        |init| Sequential::from_spec(init, spec),
        ddp::sgd,
        options(),
    )
}

/// A linear model on `d`, joined by `comm`.
fn linear_dp(comm: ThreadComm, d: &Device) -> DataParallel<Sequential, Sgd> {
    ranked(comm, d, "flatten linear(64,10)").unwrap()
}

#[test]
fn a_rank_that_fails_alone_fails_every_rank_without_a_hang() {
    let results = on_ranks(2, |rank, comm| {
        let d = own_device();
        // Rank 1's model cannot be built.
        let spec = if rank == 1 {
            "linear(64,10) nonsense"
        } else {
            "flatten linear(64,10)"
        };
        let built = ranked(comm, &d, spec);
        built.err().map(|e| e.to_string())
    });
    assert!(
        results[0]
            .as_ref()
            .unwrap()
            .contains("1 rank(s) could not build"),
        "{results:?}"
    );
    assert!(
        !results[1].as_ref().unwrap().contains("rank(s)"),
        "rank 1's own error: {results:?}"
    );

    // Rank 1 passes two slices for its one replica; rank 0 a good one. Then both go on.
    let results = on_ranks(2, |rank, comm| {
        let d = own_device();
        let mut dp = linear_dp(comm, &d);
        let n = if rank == 1 { 2 } else { 1 };
        let shards: Vec<Batch> = (0..n).map(|_| first_samples(&d, 8)).collect();
        let failed = dp
            .step(&shards, None)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let next = dp.step(&[first_samples(&d, 8)], None);
        (failed, next.is_ok())
    });
    let e0 = results[0].0.as_ref().unwrap_err();
    assert!(
        e0.contains("1 other rank(s) failed before the backward pass"),
        "{e0}"
    );
    let e1 = results[1].0.as_ref().unwrap_err();
    assert!(e1.contains("2 slices for 1 replicas"), "{e1}");
    assert!(
        results[0].1 && results[1].1,
        "the ranks could not go on together"
    );

    // Rank 1's loader yields fewer batches per epoch.
    let set = ddp::train_set().unwrap();
    let results = on_ranks(2, |rank, comm| {
        let d = own_device();
        let mut dp = linear_dp(comm, &d);
        let batch = if rank == 1 { 512 } else { 256 };
        let loaders = dp.loaders(|d| DataLoader::new(&set, batch, d)).unwrap();
        dp.train_epoch(&loaders, 0, None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    for r in &results {
        assert!(
            r.as_ref()
                .unwrap_err()
                .contains("not every rank has as many"),
            "{results:?}"
        );
    }
}
