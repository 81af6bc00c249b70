//! Data-parallel training: every replica holds a copy of the model, trains on its slice of
//! each batch, and the gradients are averaged before the optimizers step, in lock-step.
//!
//! [`DataParallel`] runs one replica per [`Device`] in this process (one thread each) and,
//! with a [`Communicator`], joins the replicas of other processes: `MpiCommunicator` (cargo
//! feature `mpi`) runs over the system's MPI, one process per GPU, on one host or many.
//!
//! A step, as PyTorch's `DistributedDataParallel` does it:
//!
//! 1. Each replica runs the forward pass and the loss (a mean over its slice) and starts the
//!    backward pass.
//! 2. The gradients are grouped into buckets of about [`DataParallelOptions::bucket_bytes`],
//!    in reverse parameter order: the order backward produces them when a model declares its
//!    layers in the order it runs them, as `Sequential` does (another order stays correct,
//!    but its buckets complete later). As soon as a bucket's gradients are final, its copy to
//!    the host is submitted, and the GPU runs it while the rest of the backward pass is
//!    recorded and run.
//! 3. The host sums each bucket over the local replicas, weighting each by its share of the
//!    global batch (exact for slices of unequal size), then all-reduces it with the other
//!    processes, and hands the mean back to every replica.
//! 4. Every replica uploads the mean gradients and steps its optimizer. Since the replicas
//!    start equal (replica 0 of rank 0 is broadcast to all at creation) and see the same
//!    gradients, they stay equal. A last status word from every rank closes the step.
//!
//! Failures are `Err` on every rank together, never a hang:
//!
//! - The replica count, parameter count and shapes are checked across all replicas and ranks
//!   at creation; a rank whose model differs or fails to build fails the creation everywhere.
//! - A rank whose step fails (bad slices, a loader error, a forward pass or loss that fails,
//!   a non-finite loss) says so in the step's next collective, and every rank returns an
//!   `Err` with no parameter changed.
//! - A failure after the gradients were averaged (an optimizer step) is reported by the
//!   closing status word; since the replicas may then differ, every later step is refused.
//! - A rank that dies, or hangs, is noticed when its peers' collectives pass the
//!   communicator's timeout (`MpiCommunicator::timeout`: 300 s unless set, or
//!   `KILN_DIST_TIMEOUT` seconds), and they return [`Error::Communication`]. The timeout
//!   runs per collective, so work that only one rank does between steps (rank 0 evaluating
//!   or saving) must take less.
//!
//! Batch normalisation uses each replica's own slice statistics (not synchronised), and
//! replica 0's running statistics of rank 0 are copied to all replicas after each step
//! (PyTorch's `broadcast_buffers`); dropout draws differ per replica.
//!
//! ```
//! use kiln::data::{self, DataLoader};
//! use kiln::dist::{DataParallel, DataParallelOptions};
//! use kiln::nn::Sequential;
//! use kiln::optim::{Sgd, SgdOptions};
//! use kiln::{Device, DeviceOptions};
//!
//! // Two devices (two GPUs, or two devices on one adapter).
//! let devices = [Device::new(&DeviceOptions::default())?, Device::new(&DeviceOptions::default())?];
//! let mut dp = DataParallel::new(
//!     &devices,
//!     |init| Sequential::from_spec(init, "flatten linear(64,32) relu linear(32,10)"),
//!     |params| Sgd::new(params, SgdOptions { lr: 0.1, ..Default::default() }),
//!     DataParallelOptions::default(),
//! )?;
//! let digits = data::digits()?;
//! // Global batches of 32: each replica gets 16 samples of each.
//! let loaders = dp.loaders(|dev| DataLoader::new(&digits, 32, dev).shuffle(0))?;
//! let shards = loaders.iter().map(|l| l.epoch(0).next().unwrap()).collect::<Result<Vec<_>, _>>()?;
//! assert_eq!(shards[0].len, 16);
//! let loss = dp.step(&shards, None)?; // cross-entropy, averaged over the 32 samples
//! assert!(loss.is_finite());
//! # Ok::<(), kiln::Error>(())
//! ```

#[cfg(feature = "mpi")]
mod mpi_comm;

#[cfg(feature = "mpi")]
pub use mpi_comm::MpiCommunicator;

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use crate::data::{Batch, DataLoader};
use crate::device::{Device, PendingRead};
use crate::error::{Error, Result};
use crate::loss::cross_entropy;
use crate::nn::{Init, Module, TensorRole};
use crate::optim::Optimizer;
use crate::tensor::{DType, Tensor};
use crate::train::custom_loss;

/// Collective operations between the processes of a data-parallel job. Every rank calls the
/// same operations, with the same lengths, in the same order.
pub trait Communicator {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;

    /// The number of processes.
    fn size(&self) -> usize;

    /// Replaces `data` on every rank by its elementwise sum over the ranks.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()>;

    /// Replaces `data` on every rank by rank `root`'s.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()>;
}

/// The loss of a replica's slice from the model's output and the slice's targets: a
/// one-element mean over the slice, callable from the replicas' threads.
pub type ShardLoss<'a> = &'a (dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Sync);

/// Options of [`DataParallel`].
#[derive(Clone, Debug)]
pub struct DataParallelOptions {
    /// Seed of the [`Init`] that builds each replica (replica 0 of rank 0 is then copied to
    /// all).
    pub seed: u64,
    /// The size of a gradient bucket in bytes (PyTorch's `bucket_cap_mb`, 25 MiB): smaller
    /// buckets start their copies earlier, larger ones need fewer collectives. A parameter
    /// larger than this has a bucket of its own.
    pub bucket_bytes: usize,
    /// Copy replica 0's buffers (batch-norm running statistics) of rank 0 to every replica
    /// after each step, as PyTorch's `broadcast_buffers` (on by default).
    pub broadcast_buffers: bool,
}

impl Default for DataParallelOptions {
    fn default() -> Self {
        DataParallelOptions {
            seed: 0,
            bucket_bytes: 25 << 20,
            broadcast_buffers: true,
        }
    }
}

/// Where the time of the steps so far went ([`DataParallel::stats`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataParallelStats {
    /// Steps taken.
    pub steps: u64,
    /// Gradient buckets per step.
    pub buckets: usize,
    /// Bytes this process all-reduces with the others per step: the gradient buckets (f32),
    /// one presence flag per parameter and one status word per bucket, and the loss header.
    pub reduced_bytes_per_step: u64,
    /// Bucket copies that started during the backward pass, as soon as their gradients were
    /// final (summed over the local replicas): the copies that overlap the rest of backward.
    /// Buckets of parameters without a gradient start after it.
    pub buckets_started_in_backward: u64,
    /// Seconds of the whole steps.
    pub step_seconds: f64,
    /// Seconds the host waited for the replicas' gradient copies and summed them (GPU work
    /// that the bucketing did not hide).
    pub gather_seconds: f64,
    /// Seconds inside the communicator's collectives (the network, and waiting for slower
    /// ranks).
    pub reduce_seconds: f64,
}

/// One model replica on one device.
struct Replica<M, O> {
    device: Device,
    model: M,
    optimizer: O,
    /// The model's parameters, each once.
    params: Vec<Tensor>,
    /// Parameter index by graph node.
    index: HashMap<u64, usize>,
}

/// What a replica's thread tells the host during a step, in this order: the loss, then each
/// bucket; or that it failed.
enum Msg {
    /// The copy of the slice's mean loss (`None` for an empty slice).
    Loss(Option<PendingRead>),
    /// The copy of a bucket's gradients (the parameters that have one, in bucket order),
    /// which parameters have one, and whether the copy started during the backward pass.
    Bucket(Option<PendingRead>, Vec<bool>, bool),
    Failed(Error),
}

/// Data-parallel training of replicas of one model (see the [module docs](self)).
pub struct DataParallel<M, O> {
    replicas: Vec<Replica<M, O>>,
    comm: Option<Box<dyn Communicator>>,
    /// Parameter indices of each bucket.
    buckets: Vec<Vec<usize>>,
    /// Elements of each parameter of each bucket.
    bucket_sizes: Vec<Vec<usize>>,
    /// Indices into `state_dict()` of the buffers.
    buffers: Vec<usize>,
    options: DataParallelOptions,
    stats: DataParallelStats,
    /// Set on every rank when a step failed after its all-reduce: the replicas may differ.
    poisoned: Option<String>,
}

const OP: &str = "DataParallel";
/// The op that errors of a step name.
const STEP: &str = "DataParallel::step";

impl<M: Module, O: Optimizer + Send> DataParallel<M, O> {
    /// Replicas on `devices` of this process: `build` makes each model, `optimizer` each
    /// replica's optimizer from its parameters. Replica 0's parameters and buffers are then
    /// copied to the others.
    pub fn new(
        devices: &[Device],
        build: impl Fn(&mut Init) -> Result<M>,
        optimizer: impl Fn(Vec<Tensor>) -> Result<O>,
        options: DataParallelOptions,
    ) -> Result<Self> {
        Self::create(None, devices, build, optimizer, options)
    }

    /// [`DataParallel::new`] joined by `comm` with the replicas of the other processes (every
    /// process passes the same number of devices). Rank 0's replica 0 is broadcast to all,
    /// after the parameter count and shapes are checked on every rank: a rank whose model
    /// differs makes this an `Err` on every rank.
    pub fn with_communicator(
        comm: Box<dyn Communicator>,
        devices: &[Device],
        build: impl Fn(&mut Init) -> Result<M>,
        optimizer: impl Fn(Vec<Tensor>) -> Result<O>,
        options: DataParallelOptions,
    ) -> Result<Self> {
        Self::create(Some(comm), devices, build, optimizer, options)
    }

    fn create(
        mut comm: Option<Box<dyn Communicator>>,
        devices: &[Device],
        build: impl Fn(&mut Init) -> Result<M>,
        optimizer: impl Fn(Vec<Tensor>) -> Result<O>,
        options: DataParallelOptions,
    ) -> Result<Self> {
        let replicas = build_replicas(devices, &build, &optimizer, options.seed);
        // Every rank takes part in the check, also one whose replicas failed to build, so
        // that all of them return an `Err` together (a rank that failed, its own).
        let agreed = match comm.as_mut() {
            Some(c) => {
                let mine = replicas
                    .as_ref()
                    .ok()
                    .map(|r| (r.len() as u64, layout(&r[0].model)));
                agree(c.as_mut(), mine)
            }
            None => Ok(()),
        };
        let replicas = replicas?;
        agreed?;
        let state = replicas[0].model.state_dict();
        let buffers = state
            .iter()
            .enumerate()
            .filter(|(_, (_, _, role))| *role == TensorRole::Buffer)
            .map(|(i, _)| i)
            .collect();
        let buckets = plan_buckets(&replicas[0].params, options.bucket_bytes);
        let bucket_sizes = buckets
            .iter()
            .map(|b| b.iter().map(|&i| replicas[0].params[i].numel()).collect())
            .collect();
        let mut dp = DataParallel {
            replicas,
            comm,
            buckets,
            bucket_sizes,
            buffers,
            options,
            stats: DataParallelStats::default(),
            poisoned: None,
        };
        dp.stats.buckets = dp.buckets.len();
        dp.stats.reduced_bytes_per_step = match dp.comm {
            Some(_) => {
                let floats: usize = dp
                    .bucket_sizes
                    .iter()
                    .map(|b| b.iter().sum::<usize>() + b.len() + 1)
                    .sum();
                // The loss header and the closing status word.
                (floats as u64 + 3 + 1) * 4
            }
            None => 0,
        };
        dp.sync_state(None)?;
        Ok(dp)
    }

    /// Copies replica 0 of rank 0 to every replica: the parameters and buffers (`None`), or
    /// only the state at `Some(indices)` of `state_dict()`.
    fn sync_state(&mut self, only: Option<&[usize]>) -> Result<()> {
        if self.replicas.len() == 1 && self.comm.is_none() {
            return Ok(());
        }
        let state = self.replicas[0].model.state_dict();
        let picked: Vec<usize> = match only {
            Some(i) => i.to_vec(),
            None => (0..state.len()).collect(),
        };
        let changed =
            || Error::invalid(OP, "the model's state changed after DataParallel was made");
        let tensors: Vec<Tensor> = picked
            .iter()
            .map(|&i| state.get(i).map(|s| s.1.detach()).ok_or_else(changed))
            .collect::<Result<_>>()?;
        // Only rank 0's values are sent; the other ranks' are overwritten by the broadcast.
        let rank = self.comm.as_ref().map_or(0, |c| c.rank());
        let mut values: Vec<f32> = if rank == 0 {
            Tensor::start_read_f32(&self.replicas[0].device, &tensors)?.wait()?
        } else {
            vec![0.0; tensors.iter().map(Tensor::numel).sum()]
        };
        if let Some(comm) = self.comm.as_mut() {
            timed(&mut self.stats, || comm.broadcast(&mut values, 0))?;
        }
        for (r, rep) in self.replicas.iter().enumerate() {
            if r == 0 && rank == 0 {
                continue;
            }
            let state = rep.model.state_dict();
            let mut at = 0;
            for &i in &picked {
                let t = &state.get(i).ok_or_else(changed)?.1;
                let n = t.numel();
                let part = values.get(at..at + n).ok_or_else(changed)?;
                let v = Tensor::from_slice(part, t.dims(), &rep.device)?;
                t.assign(&v.to_dtype(t.dtype())?)?;
                at += n;
            }
        }
        Ok(())
    }

    /// One training step on one slice of the global batch per local replica (each on its
    /// replica's device; a slice may be empty). `loss` is the slice loss, a mean (`None`:
    /// cross-entropy on class labels). Returns the mean loss over the global batch, the same
    /// on every rank.
    ///
    /// A non-finite loss is an `Err` before any parameter changes, on every rank; so is a
    /// replica that fails before its gradients are all-reduced (a wrong shape in the forward
    /// pass, a loss that is not one element). A replica whose optimizer step fails after the
    /// all-reduce is an `Err` on its own rank only.
    pub fn step(&mut self, shards: &[Batch], loss: Option<ShardLoss<'_>>) -> Result<f32> {
        let checked = self.check_shards(shards).map(|()| shards);
        self.run_step(checked, loss)
    }

    fn check_shards(&self, shards: &[Batch]) -> Result<()> {
        const OP: &str = STEP;
        if shards.len() != self.replicas.len() {
            return Err(Error::invalid(
                OP,
                format!(
                    "got {} slices for {} replicas; pass one slice per replica",
                    shards.len(),
                    self.replicas.len()
                ),
            ));
        }
        for (r, (rep, s)) in self.replicas.iter().zip(shards).enumerate() {
            if !s.inputs.device().same(&rep.device) || !s.targets.device().same(&rep.device) {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    a: format!("replica {r} on {:?}", rep.device),
                    b: format!("its slice on {:?}", s.inputs.device()),
                });
            }
            if s.inputs.dims().first() != Some(&s.len) {
                return Err(Error::shape(
                    OP,
                    format!(
                        "slice {r} has {} samples but inputs of shape {:?}",
                        s.len,
                        s.inputs.dims()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A step on `shards`, or, when they are an `Err`, this rank's part in failing the step
    /// on every rank.
    fn run_step(&mut self, shards: Result<&[Batch]>, loss: Option<ShardLoss<'_>>) -> Result<f32> {
        const OP: &str = STEP;
        if let Some(why) = &self.poisoned {
            return Err(Error::invalid(
                OP,
                format!(
                    "an earlier step failed after its gradients were averaged, so the replicas may differ ({why}); make a new DataParallel, from a checkpoint"
                ),
            ));
        }
        let shards = match shards {
            Ok(s) => s,
            Err(e) => {
                // The other ranks learn of it from the loss header and stop with this one.
                if let Some(c) = self.comm.as_mut() {
                    let _ = c.all_reduce_sum(&mut [0.0, 0.0, 1.0]);
                }
                return Err(e);
            }
        };
        let start = Instant::now();
        let buckets = &self.buckets;
        let sizes = &self.bucket_sizes;
        let comm = &mut self.comm;
        let stats = &mut self.stats;
        let counts: Vec<usize> = shards.iter().map(|s| s.len).collect();
        let (reduced, late) = std::thread::scope(|scope| {
            let mut to_replicas = Vec::new();
            let mut from_replicas = Vec::new();
            let mut threads = Vec::new();
            for (rep, shard) in self.replicas.iter_mut().zip(shards) {
                let (to_host, from_replica) = channel();
                let (to_replica, from_host) = channel();
                threads.push(scope.spawn(move || {
                    if let Err(e) = run_replica(rep, shard, loss, buckets, &to_host, &from_host) {
                        let _ = to_host.send(Msg::Failed(e));
                    }
                }));
                to_replicas.push(to_replica);
                from_replicas.push(from_replica);
            }
            let reduced = Reduce {
                comm: comm.as_mut(),
                stats,
                counts: &counts,
                from: &from_replicas,
                to: &to_replicas,
            }
            .run(sizes);
            // Replicas still waiting for gradients (after an `Err`) stop here.
            drop(to_replicas);
            let mut late = None;
            for (r, t) in threads.into_iter().enumerate() {
                if t.join().is_err() {
                    late.get_or_insert(Error::invalid(
                        OP,
                        format!("replica {r}'s thread panicked"),
                    ));
                }
            }
            // A replica that failed after the host was done (uploading the mean gradients
            // or stepping its optimizer) says so last.
            for (r, rx) in from_replicas.iter().enumerate() {
                while let Ok(msg) = rx.try_recv() {
                    if let Msg::Failed(e) = msg {
                        late.get_or_insert(Error::invalid(
                            OP,
                            format!("replica {r} failed after the gradients were averaged: {e}"),
                        ));
                    }
                }
            }
            (reduced, late)
        });
        let result = reduced.and_then(|loss| self.finish_step(loss, late));
        self.stats.step_seconds += start.elapsed().as_secs_f64();
        if result.is_ok() {
            self.stats.steps += 1;
        }
        result
    }

    /// The end of a step that every rank reached (all passed the all-reduces): a status word
    /// from every rank, then the buffers of rank 0 to all.
    fn finish_step(&mut self, loss: f32, late: Option<Error>) -> Result<f32> {
        let mut status = [late.is_some() as u32 as f32];
        if let Some(c) = self.comm.as_mut() {
            timed(&mut self.stats, || c.all_reduce_sum(&mut status))?;
        }
        if status[0] > 0.0 {
            let e = late.unwrap_or_else(|| Error::Communication {
                op: STEP,
                msg: format!(
                    "{} other rank(s) failed after the gradients were averaged",
                    status[0]
                ),
            });
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        if self.options.broadcast_buffers && !self.buffers.is_empty() {
            let buffers = std::mem::take(&mut self.buffers);
            let synced = self.sync_state(Some(&buffers));
            self.buffers = buffers;
            synced?;
        }
        Ok(loss)
    }

    /// The loaders of this process's replicas: `make` builds one per replica device (all
    /// alike: the global batch size, the same shuffle seed), and each is
    /// [sharded](DataLoader::shard) by its replica's global rank.
    pub fn loaders<'a>(
        &self,
        make: impl Fn(&Device) -> DataLoader<'a>,
    ) -> Result<Vec<DataLoader<'a>>> {
        let world = self.world_size();
        self.replicas
            .iter()
            .enumerate()
            .map(|(r, rep)| make(&rep.device).shard(self.rank() + r, world))
            .collect()
    }

    /// Trains one epoch over `loaders` (one per replica, as from [`DataParallel::loaders`]):
    /// the models are put in training mode and [`DataParallel::step`] runs on each batch.
    /// Returns the loss of each step.
    pub fn train_epoch(
        &mut self,
        loaders: &[DataLoader<'_>],
        epoch: usize,
        loss: Option<ShardLoss<'_>>,
    ) -> Result<Vec<f32>> {
        const OP: &str = "DataParallel::train_epoch";
        let local = if loaders.len() != self.replicas.len() {
            Err(Error::invalid(
                OP,
                format!(
                    "got {} loaders for {} replicas",
                    loaders.len(),
                    self.replicas.len()
                ),
            ))
        } else {
            let steps = loaders[0].len();
            match loaders.iter().find(|l| l.len() != steps) {
                Some(l) => Err(Error::invalid(
                    OP,
                    format!(
                        "the loaders have different numbers of batches ({steps} and {})",
                        l.len()
                    ),
                )),
                None => Ok(steps),
            }
        };
        if let Some(c) = self.comm.as_mut() {
            // Every rank must take as many steps: sum(s) = n s and sum(s^2) = n s^2 hold on
            // a rank only when every rank's s is its own (a failed rank sends -1).
            let s = local.as_ref().map_or(-1.0, |&n| n as f32);
            let mut sums = [s, s * s];
            c.all_reduce_sum(&mut sums)?;
            let n = c.size() as f32;
            if local.is_ok() && sums != [n * s, n * s * s] {
                return Err(Error::Communication {
                    op: OP,
                    msg: format!(
                        "rank {} has {s} batches per epoch but not every rank has as many; shard the same dataset with the same batch size on every rank, and build each loader without errors",
                        c.rank()
                    ),
                });
            }
        }
        let steps = local?;
        self.set_training(true);
        let mut epochs: Vec<_> = loaders.iter().map(|l| l.epoch(epoch)).collect();
        let mut losses = Vec::with_capacity(steps);
        for _ in 0..steps {
            let shards = epochs
                .iter_mut()
                .map(|e| {
                    e.next()
                        .unwrap_or_else(|| Err(Error::invalid(OP, "a loader ran out of batches")))
                })
                .collect::<Result<Vec<Batch>>>();
            let loss = match shards.and_then(|s| self.check_shards(&s).map(|()| s)) {
                Ok(s) => self.run_step(Ok(&s), loss),
                Err(e) => self.run_step(Err(e), loss),
            };
            losses.push(loss?);
        }
        Ok(losses)
    }

    /// Writes replica 0's model and optimizer with [`crate::checkpoint::save`] on rank 0 only;
    /// returns whether this process wrote it. The replicas are equal, so rank 0's is the
    /// model.
    pub fn save_checkpoint(&self, path: &Path, spec: Option<&str>) -> Result<bool> {
        if self.rank() != 0 {
            return Ok(false);
        }
        let rep = &self.replicas[0];
        crate::checkpoint::save(path, &rep.model, Some(&rep.optimizer), spec)?;
        Ok(true)
    }

    /// Replica 0's model (all replicas are equal after each step).
    pub fn model(&self) -> &M {
        &self.replicas[0].model
    }

    /// Replica 0's model, mutably, for evaluating it ([`crate::train::evaluate`]). A change
    /// of its parameters must be made on every replica of every rank, or they drift apart.
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.replicas[0].model
    }

    /// Replica `r`'s model in this process (`None` past the last).
    pub fn replica(&self, r: usize) -> Option<&M> {
        self.replicas.get(r).map(|rep| &rep.model)
    }

    /// Replica 0's optimizer.
    pub fn optimizer(&self) -> &O {
        &self.replicas[0].optimizer
    }

    /// Takes the model out of replica 0 (for freezing or saving), dropping the rest.
    pub fn into_model(mut self) -> M {
        self.replicas.swap_remove(0).model
    }

    /// Sets every replica's training mode ([`Module::set_training`]).
    pub fn set_training(&mut self, training: bool) {
        for rep in &mut self.replicas {
            rep.model.set_training(training);
        }
    }

    /// Sets every replica's learning rate (for schedules).
    pub fn set_lr(&mut self, lr: f32) {
        for rep in &mut self.replicas {
            rep.optimizer.set_lr(lr);
        }
    }

    /// The number of replicas in this process.
    pub fn local_replicas(&self) -> usize {
        self.replicas.len()
    }

    /// The global rank of this process's replica 0 (replica `r` has rank `rank() + r`).
    pub fn rank(&self) -> usize {
        self.comm
            .as_ref()
            .map_or(0, |c| c.rank() * self.replicas.len())
    }

    /// Replicas over all processes.
    pub fn world_size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.size()) * self.replicas.len()
    }

    /// Gradient buckets, each a list of parameter indices in
    /// [`Module::parameters`] order (without repeats).
    pub fn buckets(&self) -> &[Vec<usize>] {
        &self.buckets
    }

    /// The communicator joining this process to the others (`None` within one process),
    /// for collectives of the caller's own, such as averaging a metric. Every rank must call
    /// the same ones in the same order.
    pub fn communicator_mut(&mut self) -> Option<&mut (dyn Communicator + 'static)> {
        self.comm.as_deref_mut()
    }

    /// Where the time of the steps so far went.
    pub fn stats(&self) -> DataParallelStats {
        self.stats.clone()
    }
}

/// The replicas of this process, each checked against replica 0.
fn build_replicas<M: Module, O: Optimizer>(
    devices: &[Device],
    build: &dyn Fn(&mut Init) -> Result<M>,
    optimizer: &dyn Fn(Vec<Tensor>) -> Result<O>,
    seed: u64,
) -> Result<Vec<Replica<M, O>>> {
    if devices.is_empty() {
        return Err(Error::invalid(OP, "needs at least one device"));
    }
    let mut replicas = Vec::with_capacity(devices.len());
    for device in devices {
        let model = build(&mut Init::new(device, seed))?;
        let mut params: Vec<Tensor> = Vec::new();
        let mut index = HashMap::new();
        for (name, p) in model.named_parameters() {
            let id = p.node_id().filter(|_| p.is_leaf()).ok_or_else(|| {
                Error::invalid(
                    OP,
                    format!("parameter {name} is not a leaf that requires grad"),
                )
            })?;
            if let std::collections::hash_map::Entry::Vacant(slot) = index.entry(id) {
                slot.insert(params.len());
                params.push(p);
            }
        }
        let optimizer = optimizer(params.clone())?;
        replicas.push(Replica {
            device: device.clone(),
            model,
            optimizer,
            params,
            index,
        });
    }
    let first = layout(&replicas[0].model);
    for (r, rep) in replicas.iter().enumerate().skip(1) {
        if layout(&rep.model) != first {
            return Err(Error::invalid(
                OP,
                format!(
                    "replica {r}'s model differs from replica 0's: {} against {}",
                    describe_layout(&layout(&rep.model)),
                    describe_layout(&first)
                ),
            ));
        }
    }
    let state = replicas[0].model.state_dict();
    if let Some((name, t, _)) = state.iter().find(|(_, t, _)| t.dtype() == DType::I32) {
        return Err(Error::invalid(
            OP,
            format!(
                "{name} is an i32 tensor of shape {:?}; only float parameters and buffers can be kept equal across replicas",
                t.dims()
            ),
        ));
    }
    Ok(replicas)
}

/// Checks that every rank built as many replicas of the same model (`mine`: the replica
/// count and layout; `None` when this rank failed to build them): `Ok` on every rank, or
/// `Err` on every rank.
fn agree(comm: &mut dyn Communicator, mine: Option<(u64, (u64, u64, u64))>) -> Result<()> {
    const OP: &str = "DataParallel::with_communicator";
    let rank = comm.rank();
    let words = mine.map_or([0; 4], |(n, l)| [n, l.0, l.1, l.2]);
    let ours: Vec<f32> = words.iter().flat_map(|&w| u64_to_f32s(w)).collect();
    let mut root = ours.clone();
    comm.broadcast(&mut root, 0)?;
    let differs = mine.is_none() || root != ours;
    let mut count = [differs as u32 as f32];
    comm.all_reduce_sum(&mut count)?;
    if count[0] == 0.0 {
        return Ok(());
    }
    let theirs: Vec<u64> = root.chunks(4).map(f32s_to_u64).collect();
    let msg = match mine {
        // This rank's own error is the one to return.
        None => format!("rank {rank} could not build its replicas"),
        Some(_) if theirs[0] == 0 => "rank 0 could not build its replicas".to_string(),
        Some((n, l)) if differs => format!(
            "rank {rank} has {n} replicas of a model with {}, rank 0 has {} of {}; every rank must build the same model on as many devices",
            describe_layout(&l),
            theirs[0],
            describe_layout(&(theirs[1], theirs[2], theirs[3]))
        ),
        Some((n, l)) => format!(
            "{} rank(s) could not build their replicas or have a model that differs from rank {rank}'s ({n} replicas of {}); every rank must build the same model on as many devices",
            count[0],
            describe_layout(&l)
        ),
    };
    Err(Error::Communication { op: OP, msg })
}

/// Buckets of at most `cap` bytes (one parameter more when alone), in reverse order.
fn plan_buckets(params: &[Tensor], cap: usize) -> Vec<Vec<usize>> {
    let mut buckets = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0usize;
    for i in (0..params.len()).rev() {
        let b = params[i].numel() * 4;
        if !current.is_empty() && bytes + b > cap {
            buckets.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += b;
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

/// (parameter tensors, parameter elements, a hash of every name and shape of the state).
fn layout(model: &dyn Module) -> (u64, u64, u64) {
    let params = model.parameters();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (name, t, role) in model.state_dict() {
        eat(name.as_bytes());
        eat(&[role as u8, t.dims().len() as u8]);
        for &d in t.dims() {
            eat(&(d as u64).to_le_bytes());
        }
    }
    (
        params.len() as u64,
        params.iter().map(|p| p.numel() as u64).sum(),
        hash,
    )
}

fn describe_layout(l: &(u64, u64, u64)) -> String {
    format!(
        "{} parameter tensors of {} elements (layout hash {:016x})",
        l.0, l.1, l.2
    )
}

/// A u64 as four exact f32s of 16 bits each.
fn u64_to_f32s(v: u64) -> [f32; 4] {
    [0, 16, 32, 48].map(|s| ((v >> s) & 0xffff) as f32)
}

fn f32s_to_u64(w: &[f32]) -> u64 {
    w.iter()
        .zip([0, 16, 32, 48])
        .map(|(&x, s)| (x as u64 & 0xffff) << s)
        .sum()
}

/// One replica's part of a step, on its own thread.
fn run_replica<M: Module, O: Optimizer>(
    rep: &mut Replica<M, O>,
    shard: &Batch,
    loss: Option<ShardLoss<'_>>,
    buckets: &[Vec<usize>],
    to_host: &Sender<Msg>,
    from_host: &Receiver<Arc<Vec<f32>>>,
) -> Result<()> {
    // A closed channel means the host stopped the step: there is no one left to tell.
    let send = |m: Msg| to_host.send(m).map_err(|_| stopped());
    if shard.len == 0 {
        send(Msg::Loss(None))?;
        for b in buckets {
            send(Msg::Bucket(None, vec![false; b.len()], false))?;
        }
    } else {
        let out = rep.model.forward(&shard.inputs)?;
        let l = match loss {
            Some(f) => custom_loss(STEP, f, &out, &shard.targets)?,
            None => cross_entropy(&out, &shard.targets, &Default::default())?,
        };
        // Submitting here starts the forward pass on the GPU while backward is recorded.
        send(Msg::Loss(Some(Tensor::start_read_f32(
            &rep.device,
            &[l.detach()],
        )?)))?;
        for p in &rep.params {
            p.zero_grad();
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; rep.params.len()];
        let mut next = 0;
        let (device, index) = (&rep.device, &rep.index);
        l.backward_hooked(&mut |id, g| {
            if let Some(&i) = index.get(&id) {
                grads[i] = Some(g.clone());
                while next < buckets.len() && buckets[next].iter().all(|&i| grads[i].is_some()) {
                    send(start_bucket(device, &buckets[next], &grads, true)?)?;
                    next += 1;
                }
            }
            Ok(())
        })?;
        // Parameters the loss does not depend on have no gradient.
        for b in &buckets[next..] {
            send(start_bucket(&rep.device, b, &grads, false)?)?;
        }
    }
    for b in buckets {
        let mean = from_host.recv().map_err(|_| stopped())?;
        let (values, present) = mean.split_at(b.iter().map(|&i| rep.params[i].numel()).sum());
        let mut at = 0;
        for (&i, &has) in b.iter().zip(present) {
            let p = &rep.params[i];
            let n = p.numel();
            let g = if has > 0.0 {
                let g = Tensor::from_slice(&values[at..at + n], p.dims(), &rep.device)?;
                Some(g.to_dtype(p.dtype())?)
            } else {
                None
            };
            p.set_grad(g)?;
            at += n;
        }
    }
    rep.optimizer.step()
}

fn stopped() -> Error {
    Error::invalid(STEP, "the step was stopped")
}

fn start_bucket(
    device: &Device,
    bucket: &[usize],
    grads: &[Option<Tensor>],
    in_backward: bool,
) -> Result<Msg> {
    let present: Vec<bool> = bucket.iter().map(|&i| grads[i].is_some()).collect();
    let tensors: Vec<Tensor> = bucket.iter().filter_map(|&i| grads[i].clone()).collect();
    Ok(Msg::Bucket(
        Some(Tensor::start_read_f32(device, &tensors)?),
        present,
        in_backward,
    ))
}

/// The host's part of a step.
struct Reduce<'a> {
    comm: Option<&'a mut Box<dyn Communicator>>,
    stats: &'a mut DataParallelStats,
    counts: &'a [usize],
    from: &'a [Receiver<Msg>],
    to: &'a [Sender<Arc<Vec<f32>>>],
}

impl Reduce<'_> {
    /// Gathers the losses, then each bucket (`sizes`: elements per parameter), and hands the
    /// means back; returns the global mean loss.
    fn run(&mut self, sizes: &[Vec<usize>]) -> Result<f32> {
        const OP: &str = STEP;
        // The loss header: weighted loss sum, samples, and whether this rank failed.
        let (from, counts) = (self.from, self.counts);
        let mut failure: Option<Error> = None;
        let mut header = [0.0f32; 3];
        for (r, rx) in from.iter().enumerate() {
            let n = counts[r] as f32;
            header[1] += n;
            match self.receive(r, rx) {
                Ok(Msg::Loss(Some(read))) => match self.gather(read) {
                    Ok(v) => header[0] += n * v.first().copied().unwrap_or(f32::NAN),
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                },
                Ok(Msg::Loss(None)) => {}
                Ok(_) => {
                    failure.get_or_insert(out_of_order(r));
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        header[2] = failure.is_some() as u32 as f32;
        self.all_reduce(&mut header)?;
        if let Some(e) = failure {
            return Err(e);
        }
        if header[2] > 0.0 {
            return Err(Error::Communication {
                op: OP,
                msg: format!(
                    "{} other rank(s) failed before the backward pass; no parameter was changed",
                    header[2]
                ),
            });
        }
        let total = header[1];
        if total == 0.0 {
            return Err(Error::invalid(OP, "every slice of this step is empty"));
        }
        let loss = header[0] / total;
        if !loss.is_finite() {
            return Err(Error::invalid(
                OP,
                format!(
                    "the loss is {loss} (the mean over the {total} samples of the global batch); no parameter was changed"
                ),
            ));
        }
        for (k, sizes) in sizes.iter().enumerate() {
            let len = sizes.iter().sum();
            // The mean gradients, a presence count per parameter, and a failure count.
            let mut sum = vec![0.0f32; len + sizes.len() + 1];
            for (r, rx) in from.iter().enumerate() {
                let weight = counts[r] as f32 / total;
                let part = match self.receive(r, rx) {
                    Ok(Msg::Bucket(read, present, in_backward)) => {
                        self.stats.buckets_started_in_backward += in_backward as u64;
                        match read.map(|r| self.gather(r)) {
                            Some(Ok(values)) => Ok(Some((values, present))),
                            Some(Err(e)) => Err(e),
                            None => Ok(None),
                        }
                    }
                    Ok(_) => Err(out_of_order(r)),
                    Err(e) => Err(e),
                };
                match part {
                    Ok(Some((values, present))) => {
                        let t = Instant::now();
                        add_bucket(&mut sum, len, sizes, &values, &present, weight);
                        self.stats.gather_seconds += t.elapsed().as_secs_f64();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
            sum[len + sizes.len()] = failure.is_some() as u32 as f32;
            self.all_reduce(&mut sum)?;
            if let Some(e) = failure {
                return Err(e);
            }
            if sum[len + sizes.len()] > 0.0 {
                return Err(Error::Communication {
                    op: OP,
                    msg: format!(
                        "{} other rank(s) failed during the backward pass (bucket {k}); no parameter was changed",
                        sum[len + sizes.len()]
                    ),
                });
            }
            sum.truncate(len + sizes.len());
            let mean = Arc::new(sum);
            for tx in self.to {
                // A replica that stopped has already said why.
                let _ = tx.send(mean.clone());
            }
        }
        Ok(loss)
    }

    fn receive(&self, r: usize, rx: &Receiver<Msg>) -> Result<Msg> {
        match rx.recv() {
            Ok(Msg::Failed(e)) => Err(e),
            Ok(m) => Ok(m),
            Err(_) => Err(Error::invalid(
                STEP,
                format!("replica {r}'s thread ended without finishing its step"),
            )),
        }
    }

    /// Waits for a copy and returns its f32 values.
    fn gather(&mut self, read: PendingRead) -> Result<Vec<f32>> {
        let t = Instant::now();
        let values = read.wait()?;
        self.stats.gather_seconds += t.elapsed().as_secs_f64();
        Ok(values)
    }

    fn all_reduce(&mut self, data: &mut [f32]) -> Result<()> {
        match self.comm.as_mut() {
            Some(c) => timed(self.stats, || c.all_reduce_sum(data)),
            None => Ok(()),
        }
    }
}

/// Runs a collective, adding its time to `stats.reduce_seconds`.
fn timed(stats: &mut DataParallelStats, collective: impl FnOnce() -> Result<()>) -> Result<()> {
    let t = Instant::now();
    let r = collective();
    stats.reduce_seconds += t.elapsed().as_secs_f64();
    r
}

fn out_of_order(r: usize) -> Error {
    Error::invalid(STEP, format!("replica {r} sent its messages out of order"))
}

/// Adds `weight` times one replica's bucket (`values` holds the present parameters only) to
/// `sum` (every parameter, then the presence counts).
fn add_bucket(
    sum: &mut [f32],
    len: usize,
    sizes: &[usize],
    values: &[f32],
    present: &[bool],
    weight: f32,
) {
    let (mut src, mut dst) = (0, 0);
    for (j, (&n, &has)) in sizes.iter().zip(present).enumerate() {
        if has {
            for (s, v) in sum[dst..dst + n].iter_mut().zip(&values[src..src + n]) {
                *s += weight * v;
            }
            src += n;
            sum[len + j] += 1.0;
        }
        dst += n;
    }
}
