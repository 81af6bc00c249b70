//! [`Communicator`] over MPI (the `mpi` crate and the system's MPI library).

use std::ffi::{c_char, c_int, c_void};
use std::mem::ManuallyDrop;
use std::time::{Duration, Instant};

use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator as _, SimpleCommunicator};

use super::Communicator;
use crate::error::{Error, Result};

/// The timeout of a collective when neither [`MpiCommunicator::with_timeout`] nor
/// `KILN_DIST_TIMEOUT` sets one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// MPI's world communicator, for [`super::DataParallel::with_communicator`]: one process
/// per GPU, started by `mpirun`.
///
/// Every collective is non-blocking MPI (`MPI_Iallreduce`, `MPI_Ibcast`) polled until it
/// completes or [`MpiCommunicator::timeout`] passes. A peer that dies or stops answering
/// thus gives [`Error::Communication`] within the timeout on the others instead of a hang;
/// after that the communicator refuses every call, and the process should exit (with
/// `std::process::exit`, since finalising MPI may wait for the dead peer). Errors that MPI
/// itself reports are returned the same way (MPI's error handler is set to return them).
///
/// `mpirun` aborts the whole job when a process dies, unless told not to: with Open MPI,
/// `mpirun --mca orte_enable_recovery 1` lets the survivors see the `Err`.
///
/// ```no_run
/// use kiln::dist::{Communicator, MpiCommunicator};
/// let mut comm = MpiCommunicator::init()?.with_timeout(std::time::Duration::from_secs(60));
/// let mut v = [comm.rank() as f32];
/// comm.all_reduce_sum(&mut v)?; // 0 + 1 + ... + (size - 1) on every rank
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct MpiCommunicator {
    /// Finalises MPI when dropped, unless a collective failed.
    universe: ManuallyDrop<mpi::environment::Universe>,
    world: SimpleCommunicator,
    timeout: Duration,
    /// Why the communicator is unusable, after a failed collective.
    broken: Option<String>,
}

impl MpiCommunicator {
    /// Initialises MPI (once per process) and takes its world. The timeout is
    /// `KILN_DIST_TIMEOUT` seconds when set, 300 s otherwise.
    pub fn init() -> Result<MpiCommunicator> {
        const OP: &str = "MpiCommunicator::init";
        let timeout = match std::env::var("KILN_DIST_TIMEOUT") {
            Ok(v) => {
                let secs: f64 = v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| {
                        Error::invalid(
                            OP,
                            format!("KILN_DIST_TIMEOUT={v:?} is not a positive number of seconds"),
                        )
                    })?;
                Duration::from_secs_f64(secs)
            }
            Err(_) => DEFAULT_TIMEOUT,
        };
        // Only the thread that owns the communicator calls MPI (it is not `Send`): the one
        // that initialised it.
        let (universe, provided) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Communication {
                op: OP,
                msg: "MPI is already initialised in this process".into(),
            })?;
        if provided == mpi::Threading::Single {
            return Err(Error::Communication {
                op: OP,
                msg: "this MPI library supports only single-threaded processes (MPI_THREAD_SINGLE); kiln's replicas and GPU drivers run threads of their own".into(),
            });
        }
        let world = universe.world();
        // SAFETY: the world communicator is valid while the universe lives, and the handler is
        // one of MPI's predefined ones.
        let rc = unsafe { ffi::MPI_Comm_set_errhandler(world.as_raw(), ffi::RSMPI_ERRORS_RETURN) };
        if rc != 0 {
            return Err(Error::Communication {
                op: OP,
                msg: format!("setting MPI's error handler failed: {}", error_string(rc)),
            });
        }
        Ok(MpiCommunicator {
            universe: ManuallyDrop::new(universe),
            world,
            timeout,
            broken: None,
        })
    }

    /// The same communicator with another timeout for each collective.
    pub fn with_timeout(mut self, timeout: Duration) -> MpiCommunicator {
        self.timeout = timeout;
        self
    }

    /// How long one collective may take before it is an `Err`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts a collective on `buf` (with `start`), then polls it until it completes or the
    /// timeout passes. On any failure `buf` is leaked, since MPI may still write into it.
    fn collective(
        &mut self,
        op: &'static str,
        buf: Vec<f32>,
        start: impl FnOnce(&mut [f32], &mut ffi::MPI_Request) -> c_int,
    ) -> Result<Vec<f32>> {
        if let Some(why) = &self.broken {
            return Err(Error::Communication {
                op,
                msg: format!("the communicator is unusable since an earlier failure: {why}"),
            });
        }
        let mut buf = ManuallyDrop::new(buf);
        // SAFETY: a request handle is plain data that MPI fills in.
        let mut request: ffi::MPI_Request = unsafe { std::mem::zeroed() };
        let rc = start(&mut buf, &mut request);
        if rc != 0 {
            return Err(self.fail(
                op,
                format!("MPI refused the collective: {}", error_string(rc)),
            ));
        }
        let began = Instant::now();
        let mut polls = 0u32;
        loop {
            let mut done: c_int = 0;
            // SAFETY: `request` was started above and has not completed; the status is ignored.
            let rc = unsafe { ffi::MPI_Test(&mut request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            if rc != 0 {
                return Err(self.fail(op, format!("MPI failed: {}", error_string(rc))));
            }
            if done != 0 {
                return Ok(ManuallyDrop::into_inner(buf));
            }
            if began.elapsed() > self.timeout {
                return Err(self.fail(
                    op,
                    format!(
                        "rank {} of {}: no answer from every peer within the timeout of {:.1} s; a rank died or stopped calling the same collectives",
                        self.rank(),
                        self.size(),
                        self.timeout.as_secs_f64()
                    ),
                ));
            }
            // Spin briefly for low latency, then yield the core to the GPU threads.
            polls += 1;
            if polls > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn fail(&mut self, op: &'static str, msg: String) -> Error {
        self.broken = Some(msg.clone());
        Error::Communication { op, msg }
    }
}

/// MPI counts are `int`: longer data goes in several collectives.
const CHUNK: usize = 1 << 30;

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let comm = self.world.as_raw();
        for part in data.chunks_mut(CHUNK) {
            // The input stays alive, unread by us, for as long as MPI may read it.
            let send = ManuallyDrop::new(part.to_vec());
            let out = self.collective("all_reduce_sum", vec![0.0; part.len()], |recv, req| {
                // SAFETY: both buffers hold `part.len()` f32s and outlive the request (they
                // are leaked if it never completes).
                unsafe {
                    ffi::MPI_Iallreduce(
                        send.as_ptr() as *const c_void,
                        recv.as_mut_ptr() as *mut c_void,
                        part.len() as c_int,
                        ffi::RSMPI_FLOAT,
                        ffi::RSMPI_SUM,
                        comm,
                        req,
                    )
                }
            })?;
            drop(ManuallyDrop::into_inner(send));
            part.copy_from_slice(&out);
        }
        Ok(())
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(Error::invalid(
                "broadcast",
                format!("root {root} is out of range for {} ranks", self.size()),
            ));
        }
        let comm = self.world.as_raw();
        for part in data.chunks_mut(CHUNK) {
            let out = self.collective("broadcast", part.to_vec(), |buf, req| {
                // SAFETY: the buffer holds `buf.len()` f32s and outlives the request.
                unsafe {
                    ffi::MPI_Ibcast(
                        buf.as_mut_ptr() as *mut c_void,
                        buf.len() as c_int,
                        ffi::RSMPI_FLOAT,
                        root as c_int,
                        comm,
                        req,
                    )
                }
            })?;
            part.copy_from_slice(&out);
        }
        Ok(())
    }
}

impl Drop for MpiCommunicator {
    fn drop(&mut self) {
        // Finalising after a failure could wait forever for the dead peer.
        if self.broken.is_none() {
            // SAFETY: dropped once, here.
            unsafe { ManuallyDrop::drop(&mut self.universe) };
        }
    }
}

/// MPI's text for an error code.
fn error_string(code: c_int) -> String {
    // Larger than MPI_MAX_ERROR_STRING of Open MPI (256) and MPICH (1024).
    let mut text = [0 as c_char; 4096];
    let mut len: c_int = 0;
    // SAFETY: MPI writes at most MPI_MAX_ERROR_STRING characters, fewer than the buffer.
    let rc = unsafe { ffi::MPI_Error_string(code, text.as_mut_ptr(), &mut len) };
    if rc != 0 {
        return format!("MPI error {code}");
    }
    let bytes: Vec<u8> = text[..len.clamp(0, 4096) as usize]
        .iter()
        .map(|&c| c as u8)
        .collect();
    format!("{} (MPI error {code})", String::from_utf8_lossy(&bytes))
}
