//! Data parallelism across processes: this test runs itself under `mpirun -np 2
//! --oversubscribe` on loopback (a harness of its own: the processes mpirun starts are the
//! ranks).
//!
//! - Two ranks train 20 steps of the digits CNN with a global batch of 64 (32 per rank), and
//!   match one process with batch 64 on the same data order: every step's loss within 1e-5
//!   relative, the final parameters within 1e-5.
//! - Rank 1 kills itself mid-run: rank 0 gets an `Err` within the communicator's timeout.
//!
//! Needs Open MPI's `mpirun` (Debian: `openmpi-bin`); `scripts/test_mpi` installs it and runs
//! this test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ddp::{self, CNN, GLOBAL_BATCH, SHUFFLE_SEED, STEPS};
use common::own_device;
use kiln::data::DataLoader;
use kiln::dist::{Communicator, DataParallel, DataParallelOptions, MpiCommunicator};
use kiln::nn::Sequential;

/// The collective timeout of the kill test.
const KILL_TIMEOUT_S: f64 = 8.0;
/// The step at which rank 1 dies.
const KILL_STEP: usize = 5;

fn main() {
    match std::env::var("KILN_MPI_TEST") {
        Ok(mode) => rank_main(&mode),
        Err(_) => {
            let mut failed = 0;
            for (name, test) in [
                (
                    "two_ranks_match_one_process",
                    two_ranks_match_one_process as fn(),
                ),
                (
                    "a_killed_rank_is_an_err_on_the_other",
                    a_killed_rank_is_an_err_on_the_other,
                ),
            ] {
                let t = Instant::now();
                let ok = std::panic::catch_unwind(test).is_ok();
                println!(
                    "test {name} ... {} ({:.1} s)",
                    if ok { "ok" } else { "FAILED" },
                    t.elapsed().as_secs_f64()
                );
                failed += !ok as usize;
            }
            if failed > 0 {
                println!("test result: FAILED. {failed} failed");
                std::process::exit(101);
            }
            println!("test result: ok. 2 passed");
        }
    }
}

/// Runs this binary as 2 ranks in `mode`, each writing to `out`; returns mpirun's output.
fn mpirun(mode: &str, out: &Path, extra: &[&str], env: &[(&str, &str)], limit: Duration) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", "2", "--oversubscribe"])
        // Loopback TCP only: no shared-memory transport, which containers often restrict.
        .args([
            "--mca",
            "btl",
            "self,tcp",
            "--mca",
            "btl_tcp_if_include",
            "lo",
        ])
        .args(["--mca", "oob_tcp_if_include", "lo"])
        .args(extra)
        .arg(exe)
        .env("KILN_MPI_TEST", mode)
        .env("KILN_MPI_OUT", out)
        // mpirun refuses to start as root without these (CI containers run as root).
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot start mpirun ({e}): install Open MPI (Debian: openmpi-bin libopenmpi-dev), as scripts/test_mpi does")
    });
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("mpirun {mode} did not finish within {limit:?}: a rank hangs");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    text
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-mpi-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn two_ranks_match_one_process() {
    let expected = ddp::reference(&own_device()).unwrap();
    let out = scratch("match");
    let log = mpirun("match", &out, &[], &[], Duration::from_secs(300));
    let mut per_rank = Vec::new();
    for rank in 0..2 {
        let text = std::fs::read_to_string(out.join(format!("rank{rank}.txt")))
            .unwrap_or_else(|e| panic!("rank {rank} wrote no result ({e}); mpirun said:\n{log}"));
        let mut lines = text.lines();
        let floats = |l: Option<&str>| -> Vec<f32> {
            l.unwrap()
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        let losses = floats(lines.next());
        let params: Vec<(String, Vec<f32>)> = expected
            .1
            .iter()
            .map(|(name, _)| (name.clone(), floats(lines.next())))
            .collect();
        per_rank.push((losses, params));
    }
    assert_eq!(per_rank[0], per_rank[1], "the ranks differ");
    let (dl, dp) = ddp::compare(&per_rank[0].0, &per_rank[0].1, &expected).unwrap();
    println!("largest relative deviation from one process: loss {dl:e}, parameters {dp:e}");
    let _ = std::fs::remove_dir_all(&out);
}

fn a_killed_rank_is_an_err_on_the_other() {
    let out = scratch("kill");
    // Open MPI aborts the whole job when a rank dies unless recovery is on: with it, the
    // survivor runs on and must notice by itself.
    let timeout = KILL_TIMEOUT_S.to_string();
    mpirun(
        "kill",
        &out,
        &["--mca", "orte_enable_recovery", "1"],
        &[("KILN_DIST_TIMEOUT", &timeout)],
        Duration::from_secs(240),
    );
    let text = std::fs::read_to_string(out.join("rank0.txt"))
        .unwrap_or_else(|e| panic!("rank 0 wrote no result: {e}"));
    let (secs, msg) = text
        .strip_prefix("err ")
        .and_then(|t| t.split_once(' '))
        .unwrap_or_else(|| panic!("rank 0 did not fail: {text}"));
    let secs: f64 = secs.parse().unwrap();
    assert!(msg.contains("timeout of 8.0 s"), "{msg}");
    // The step that waits for the dead rank fails after the timeout, not long after.
    assert!(
        (KILL_TIMEOUT_S..KILL_TIMEOUT_S + 5.0).contains(&secs),
        "rank 0 failed after {secs} s"
    );
    assert!(!out.join("rank1.txt").exists(), "rank 1 was not killed");
    let _ = std::fs::remove_dir_all(&out);
}

/// One rank: 20 steps (or until killed), then its losses and parameters in its file.
fn rank_main(mode: &str) {
    let out = PathBuf::from(std::env::var("KILN_MPI_OUT").unwrap());
    let comm = MpiCommunicator::init().unwrap();
    let rank = comm.rank();
    let file = out.join(format!("rank{rank}.txt"));
    let dev = own_device();
    let set = ddp::train_set().unwrap();
    let mut losses = Vec::new();
    let mut last = Instant::now();
    let result = (|| -> kiln::Result<DataParallel<Sequential, kiln::optim::Sgd>> {
        let mut dp = DataParallel::with_communicator(
            Box::new(comm),
            std::slice::from_ref(&dev),
            |init| Sequential::from_spec(init, CNN),
            ddp::sgd,
            DataParallelOptions {
                bucket_bytes: 16 << 10,
                ..Default::default()
            },
        )?;
        let loaders =
            dp.loaders(|d| DataLoader::new(&set, GLOBAL_BATCH, d).shuffle(SHUFFLE_SEED))?;
        for (step, batch) in loaders[0].epoch(0).take(STEPS).enumerate() {
            if mode == "kill" && rank == 1 && step == KILL_STEP {
                let pid = std::process::id().to_string();
                let _ = Command::new("kill").args(["-9", &pid]).status();
                std::thread::sleep(Duration::from_secs(60));
            }
            last = Instant::now();
            losses.push(dp.step(&[batch?], None)?);
        }
        Ok(dp)
    })();
    match result {
        Ok(dp) => {
            let s = dp.stats();
            println!(
                "rank {rank}: {} steps, {:.1} ms each: {:.1} ms waiting for gradient copies, {:.1} ms in all-reduce; {} buckets, {} bytes all-reduced per step",
                s.steps,
                1e3 * s.step_seconds / s.steps as f64,
                1e3 * s.gather_seconds / s.steps as f64,
                1e3 * s.reduce_seconds / s.steps as f64,
                s.buckets,
                s.reduced_bytes_per_step
            );
            let mut text = join(&losses);
            for (_, v) in ddp::parameters(dp.model()).unwrap() {
                text.push_str(&join(&v));
            }
            std::fs::write(&file, text).unwrap();
        }
        Err(e) => {
            let secs = last.elapsed().as_secs_f64();
            println!(
                "rank {rank}: step {} failed after {secs:.2} s: {e}",
                losses.len()
            );
            std::fs::write(&file, format!("err {secs} {e}")).unwrap();
            // Finalising MPI would wait for the dead rank.
            std::process::exit(3);
        }
    }
}

fn join(v: &[f32]) -> String {
    let mut s: String = v.iter().map(|x| format!("{x:e} ")).collect();
    s.push('\n');
    s
}
