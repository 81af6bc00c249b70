//! Trains the digits example's CNN data-parallel over MPI: one process per GPU, each with a
//! replica of the model and a slice of every batch, the gradients averaged by MPI.
//!
//! ```text
//! mpirun -np 2 cargo run --release --features mpi --example ddp [-- --epochs 10 --batch 32]
//! # or build once, then start the binary:
//! cargo build --release --features mpi --example ddp
//! mpirun -np 2 target/release/examples/ddp
//! ```
//!
//! `--batch` is each rank's share, so the global batch is `batch x ranks`. The ranks of a host
//! spread over its GPUs (several ranks share one when there are fewer). Rank 0 evaluates the
//! model after each epoch and writes `digits_ddp.safetensors`; every rank prints where its
//! time went. A rank whose step fails makes every rank exit with an error; a rank that dies
//! does too, once a collective has had no answer for `KILN_DIST_TIMEOUT` seconds (300 by
//! default; rank 0's evaluation between epochs must take less).

use std::time::Instant;

use kiln::data::{self, DataLoader, Dataset};
use kiln::dist::{Communicator, DataParallel, DataParallelOptions, MpiCommunicator};
use kiln::nn::{Module, Sequential};
use kiln::optim::{Sgd, SgdOptions};
use kiln::{Device, DeviceOptions};

/// The digits example's network.
const DIGITS_CNN: &str =
    "conv2d(1,16,3,p=1) relu conv2d(16,32,3,p=1) relu maxpool2d(2) flatten linear(512,64) relu linear(64,10)";

fn main() {
    let mut epochs = 10;
    let mut batch = 32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (
            a.as_str(),
            args.next().and_then(|v| v.parse::<usize>().ok()),
        ) {
            ("--epochs", Some(v)) => epochs = v,
            ("--batch", Some(v)) if v > 0 => batch = v,
            _ => {
                eprintln!("usage: ddp [--epochs N] [--batch PER_RANK]");
                std::process::exit(2);
            }
        }
    }
    let comm = match MpiCommunicator::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ddp: {e}");
            std::process::exit(1);
        }
    };
    let rank = comm.rank();
    if let Err(e) = run(comm, epochs, batch) {
        eprintln!("rank {rank}: {e}");
        // Without finalising MPI, which could wait for a rank that is gone.
        std::process::exit(1);
    }
}

/// This process's rank on its host, from the launcher's environment (Open MPI, MPICH, Slurm).
fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

fn run(comm: MpiCommunicator, epochs: usize, batch: usize) -> kiln::Result<()> {
    let start = Instant::now();
    let (rank, ranks) = (comm.rank(), comm.size());
    let dev = Device::new(&DeviceOptions {
        adapter_index: Some(local_rank()),
        ..Default::default()
    })?;
    println!("rank {rank} of {ranks}: {dev}");
    let all = data::digits()?;
    let (train_set, test_set) = all.split(0.8, 0)?;
    let mut dp = DataParallel::with_communicator(
        Box::new(comm),
        std::slice::from_ref(&dev),
        |init| Sequential::from_spec(init, DIGITS_CNN),
        |params| {
            Sgd::new(
                params,
                SgdOptions {
                    lr: 0.05,
                    momentum: 0.9,
                    ..Default::default()
                },
            )
        },
        DataParallelOptions::default(),
    )?;
    let global = batch * dp.world_size();
    let loaders = dp.loaders(|d| DataLoader::new(&train_set, global, d).shuffle(1))?;
    if rank == 0 {
        println!(
            "{} parameters on {} ranks; {} training images in global batches of {global} ({batch} per rank)",
            dp.model().parameter_count(),
            dp.world_size(),
            train_set.len(),
        );
    }
    let test = DataLoader::new(&test_set, 256, &dev);
    for epoch in 0..epochs {
        let t = Instant::now();
        let losses = dp.train_epoch(&loaders, epoch, None)?;
        let train_loss = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
        if rank == 0 {
            let (loss, acc) = kiln::train::evaluate(dp.model_mut(), &test)?;
            println!(
                "epoch {:>2}: train loss {train_loss:.4} | test loss {loss:.4} acc {:.2}% | {:.2} s",
                epoch + 1,
                acc * 100.0,
                t.elapsed().as_secs_f64()
            );
        }
    }
    let path = std::path::Path::new("digits_ddp.safetensors");
    if dp.save_checkpoint(path, Some(DIGITS_CNN))? {
        println!("rank 0 saved {}", path.display());
    }
    let s = dp.stats();
    // The all-reduce alone, on a buffer of the gradients' size: the transport's share.
    let mut grads = vec![1.0f32; dp.model().parameter_count()];
    let reps = 20;
    let mut per = 0.0;
    if let Some(comm) = dp.communicator_mut() {
        // Every rank starts timing together (rank 0 was saving the checkpoint).
        comm.all_reduce_sum(&mut [0.0])?;
        let t = Instant::now();
        for _ in 0..reps {
            comm.all_reduce_sum(&mut grads)?;
        }
        per = t.elapsed().as_secs_f64() / reps as f64;
    }
    println!(
        "rank {rank}: all-reduce of {} bytes alone: {:.2} ms ({:.2} GB/s of gradients)",
        grads.len() * 4,
        per * 1e3,
        grads.len() as f64 * 4.0 / per / 1e9
    );
    println!(
        "rank {rank}: {} steps in {:.2} s ({:.1} ms each): {:.1} ms waiting for gradient copies, {:.1} ms in all-reduce; {} buckets, {} bytes all-reduced per step; total {:.1} s",
        s.steps,
        s.step_seconds,
        1e3 * s.step_seconds / s.steps.max(1) as f64,
        1e3 * s.gather_seconds / s.steps.max(1) as f64,
        1e3 * s.reduce_seconds / s.steps.max(1) as f64,
        s.buckets,
        s.reduced_bytes_per_step,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
