//! The GPU runtime: adapter choice, limits, pipeline cache, buffer pool, batched submission
//! and readback.
//!
//! Ops never submit work themselves. They call `Device::dispatch`, which appends a dispatch
//! to one open command encoder and compute pass; the batch is submitted only when the host
//! reads data (`Device::read_buffer`), when [`MAX_BATCH_DISPATCHES`] dispatches are pending,
//! or on [`Device::synchronize`].

mod pool;
mod tune_cache;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::kernels::{Kernel, ShaderFile, Variant, OUTPUT_BINDINGS, PARAMS_BINDING};
use pool::Pool;
pub(crate) use pool::{size_class, BufferKind};

/// Dispatches recorded before a batch is submitted without being asked.
pub const MAX_BATCH_DISPATCHES: usize = 512;

/// Stride between two dispatches' parameters in the per-batch uniform buffer. 256 is the
/// largest `min_uniform_buffer_offset_alignment` WebGPU allows, so it suits every adapter.
const PARAMS_STRIDE: usize = 256;

const NO_ADAPTER_HINT: &str =
    "kiln needs a Vulkan, Metal or DX12 adapter. On a machine without a GPU, \
install a software Vulkan driver (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`).";

/// Whether `adapter` offers what the `matmul_coop16_*` kernels need, given the optional
/// `features` kiln enables: cooperative matrices with a 16x16x16 configuration of f16 A and B
/// into f32, at subgroup scope (the only one wgpu reports), on subgroups of exactly 32
/// invocations (one per workgroup of 32), and `SHADER_F16` and `SUBGROUP`.
fn coop_f16_offered(adapter: &wgpu::Adapter, features: wgpu::Features) -> bool {
    use wgpu::CooperativeScalarType as T;
    let limits_ok = {
        let info = adapter.get_info();
        info.subgroup_min_size == 32 && info.subgroup_max_size == 32
    };
    adapter
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        && features.contains(wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP)
        && limits_ok
        && adapter.cooperative_matrix_properties().iter().any(|c| {
            [c.m_size, c.n_size, c.k_size] == [16, 16, 16]
                && c.ab_type == T::F16
                && c.cr_type == T::F32
        })
}

/// How to choose an adapter.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// Keep only adapters whose name contains this text (case-insensitive). When `None`, the
    /// `KILN_ADAPTER` environment variable is read instead.
    pub adapter: Option<String>,
    /// Prefer a low-power (integrated) adapter over a discrete one.
    pub low_power: bool,
    /// Take the adapter at this index of the matching ones, in order of preference, wrapping
    /// around when fewer match (`None`: the first). One process per GPU passes its rank on
    /// the host, so that ranks spread over the host's GPUs and share them round-robin when
    /// there are more ranks than GPUs.
    ///
    /// ```
    /// let local_rank = 3; // say, from the MPI launcher's environment
    /// let dev = kiln::Device::new(&kiln::DeviceOptions { adapter_index: Some(local_rank), ..Default::default() })?;
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub adapter_index: Option<usize>,
    /// Compile kernels without wgpu's runtime bounds checks (faster). kiln's launch code
    /// computes every index from shapes it has checked, and the test suite runs the checked
    /// kernels; off by default, on with `KILN_TRUSTED_SHADERS=1`.
    pub trusted_shaders: bool,
    /// Optional features not to enable even where the adapter has them (for example
    /// `SHADER_F16`, to run the paths of adapters without it).
    ///
    /// ```
    /// use kiln::{wgpu::Features, Device, DeviceOptions};
    /// let dev = Device::new(&DeviceOptions { without_features: Features::SHADER_F16, ..Default::default() })?;
    /// assert!(!dev.features().contains(Features::SHADER_F16));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub without_features: wgpu::Features,
    /// A file that keeps the kernel tuner's timed choices across runs, per adapter and driver
    /// (`None`: the `KILN_TUNE_CACHE` environment variable, else no file). Read when the device
    /// is made (in the timed [`TuneMode`] only), rewritten after each new timed choice; a
    /// failed write is reported by [`Device::tune_cache_error`]. Off by default: a choice timed
    /// on a busy machine would outlive the run.
    ///
    /// ```
    /// let path = std::env::temp_dir().join("kiln-doc-tune-cache.txt");
    /// let dev = kiln::Device::new(&kiln::DeviceOptions { tune_cache: Some(path), ..Default::default() })?;
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub tune_cache: Option<std::path::PathBuf>,
    /// Turn on wgpu's experimental cooperative-matrix feature where the adapter offers 16x16x16
    /// products of f16 matrices into f32 and runs 32-wide subgroups (tensor cores on NVIDIA and
    /// the like), so that f16 matmuls (half-precision frozen graphs) run on them; `false`: the
    /// `KILN_COOPERATIVE_MATRIX=1` environment variable turns it on. Off by default: wgpu marks
    /// the feature experimental, and kiln's kernel for it is untested on hardware so far.
    /// [`Device::has_cooperative_matrix`] says whether the device got it.
    ///
    /// ```
    /// let dev = kiln::Device::new(&kiln::DeviceOptions { cooperative_matrix: true, ..Default::default() })?;
    /// // Only where the adapter offers them (none on software adapters).
    /// let tensor_cores: bool = dev.has_cooperative_matrix();
    /// # let _ = tensor_cores;
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub cooperative_matrix: bool,
}

/// How the kernel tuner chooses among a family's candidate kernels (see
/// [`Device::set_tune_mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TuneMode {
    /// Each family's heuristic; nothing is timed (`KILN_AUTOTUNE=0`).
    Heuristic,
    /// The first large problem of each shape class times the candidates and the fastest is
    /// remembered (the default).
    Timed,
    /// The first problem of each shape class, of any size, runs every candidate once and
    /// compares its result with the heuristic's; a difference is an `Err` naming both kernels
    /// (`KILN_AUTOTUNE=check`). For trying kiln on a new adapter or driver.
    CrossCheck,
}

impl TuneMode {
    fn from_env() -> TuneMode {
        match std::env::var("KILN_AUTOTUNE").as_deref() {
            Ok("0") => TuneMode::Heuristic,
            Ok("check") => TuneMode::CrossCheck,
            _ => TuneMode::Timed,
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn of_code(c: u8) -> TuneMode {
        match c {
            0 => TuneMode::Heuristic,
            2 => TuneMode::CrossCheck,
            _ => TuneMode::Timed,
        }
    }
}

/// One row of [`Device::profile`].
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The WGSL entry point (and its element types when not f32).
    pub kernel: String,
    /// Dispatches of it.
    pub calls: u64,
    /// Their wall-clock seconds in all.
    pub seconds: f64,
}

/// Counters of the runtime, for tests and tuning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Queue submissions so far.
    pub submits: u64,
    /// Buffer readbacks to the host so far.
    pub readbacks: u64,
    /// Compute dispatches recorded so far.
    pub dispatches: u64,
    /// Bytes of tensor storage currently handed out by the pool.
    pub live_bytes: u64,
    /// Highest `live_bytes` seen.
    pub peak_bytes: u64,
    /// Bytes held by the pool for reuse.
    pub pooled_bytes: u64,
}

/// A GPU device with its queue, pipeline cache, buffer pool and open batch of work.
///
/// Cheap to clone (a reference count). Tensors remember their device; mixing devices in one
/// operation is an error.
///
/// ```
/// let dev = kiln::Device::default_device()?;
/// assert!(!dev.name().is_empty());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

struct Batch {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    params: Vec<u8>,
    params_buffer: Option<wgpu::Buffer>,
    dispatches: usize,
}

struct DeviceInner {
    id: usize,
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    modules: Mutex<HashMap<(ShaderFile, Variant), wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<(Kernel, Variant), Arc<Pipeline>>>,
    batch: Mutex<Batch>,
    pool: Mutex<Pool>,
    gpu_error: Arc<Mutex<Option<String>>>,
    /// Set when the device is lost: why.
    lost: Arc<Mutex<Option<String>>>,
    /// Two words kernels set on bad data they cannot refuse on the host (an index that is
    /// fractional or out of range): a code and the offending value's bits. Read and cleared
    /// with every readback, which then is an `Err`.
    fault: wgpu::Buffer,
    submits: AtomicU64,
    readbacks: AtomicU64,
    dispatches: AtomicU64,
    /// The [`TuneMode`], as its code.
    tune_mode: std::sync::atomic::AtomicU8,
    /// The tuner's cache file and its key for this adapter.
    tune_cache: Option<(std::path::PathBuf, String)>,
    /// Why the last write of the cache file failed, if it did.
    tune_cache_error: Mutex<Option<String>>,
    /// Row-reduction kernel override: 0 by the device's choice, 1 serial, 2 a workgroup per row.
    row_reduction: std::sync::atomic::AtomicU8,
    trusted_shaders: bool,
    /// Set by [`Device::choose_as_hardware`].
    as_hardware: std::sync::atomic::AtomicBool,
    tuned: Mutex<HashMap<(Kernel, [u8; 4]), Kernel>>,
    /// Per-kernel calls and seconds while profiling is on.
    profile: Mutex<Option<HashMap<String, (u64, f64)>>>,
    /// Whether profiling is on: read on every dispatch without taking the lock.
    profiling: std::sync::atomic::AtomicBool,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
static DEFAULT_DEVICE: Mutex<Option<Device>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves consistent data here (counters and
    // lists), so poisoning is not fatal.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

impl Device {
    /// The shared default device, created on first use from `KILN_ADAPTER` and `WGPU_BACKEND`.
    ///
    /// ```
    /// let a = kiln::Device::default_device()?;
    /// let b = kiln::Device::default_device()?;
    /// assert!(a.same(&b));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn default_device() -> Result<Device> {
        let mut slot = lock(&DEFAULT_DEVICE);
        if let Some(dev) = slot.as_ref() {
            return Ok(dev.clone());
        }
        let dev = Device::new(&DeviceOptions::default())?;
        *slot = Some(dev.clone());
        Ok(dev)
    }

    /// A new device of its own (its own queue, caches and pool).
    ///
    /// Adapters come from the backends named by `WGPU_BACKEND` (all native ones otherwise),
    /// filtered by `options.adapter` or `KILN_ADAPTER`; a discrete GPU is preferred unless
    /// `low_power`, then integrated, virtual, and CPU (software) adapters.
    ///
    /// ```no_run
    /// let opts = kiln::DeviceOptions { adapter: Some("llvmpipe".into()), ..Default::default() };
    /// let dev = kiln::Device::new(&opts)?;
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn new(options: &DeviceOptions) -> Result<Device> {
        let filter = options
            .adapter
            .clone()
            .or_else(|| std::env::var("KILN_ADAPTER").ok())
            .filter(|f| !f.is_empty());
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let adapters = pollster::block_on(instance.enumerate_adapters(backends));
        let found: Vec<String> = adapters.iter().map(|a| describe(&a.get_info())).collect();
        let rank = |t: wgpu::DeviceType| match (t, options.low_power) {
            (wgpu::DeviceType::DiscreteGpu, false) | (wgpu::DeviceType::IntegratedGpu, true) => 0,
            (wgpu::DeviceType::IntegratedGpu, false) | (wgpu::DeviceType::DiscreteGpu, true) => 1,
            (wgpu::DeviceType::VirtualGpu, _) => 2,
            (wgpu::DeviceType::Cpu, _) => 3,
            (wgpu::DeviceType::Other, _) => 4,
        };
        let mut matching: Vec<wgpu::Adapter> = adapters
            .into_iter()
            .filter(|a| {
                let info = a.get_info();
                info.backend != wgpu::Backend::Gl
                    && filter
                        .as_ref()
                        .is_none_or(|f| info.name.to_lowercase().contains(&f.to_lowercase()))
            })
            .collect();
        // Stable: adapters of one kind keep the order the system lists them in.
        matching.sort_by_key(|a| rank(a.get_info().device_type));
        let count = matching.len().max(1);
        let adapter = matching
            .into_iter()
            .nth(options.adapter_index.unwrap_or(0) % count)
            .ok_or_else(|| Error::NoAdapter {
                filter: filter
                    .as_ref()
                    .map(|f| format!(" matching KILN_ADAPTER=\"{f}\""))
                    .unwrap_or_default(),
                found: found.join(", "),
                hint: NO_ADAPTER_HINT,
            })?;
        let trusted = options.trusted_shaders
            || std::env::var("KILN_TRUSTED_SHADERS").is_ok_and(|v| v == "1");
        let cache = options
            .tune_cache
            .clone()
            .or_else(|| std::env::var_os("KILN_TUNE_CACHE").map(Into::into));
        let coop = options.cooperative_matrix
            || std::env::var("KILN_COOPERATIVE_MATRIX").is_ok_and(|v| v == "1");
        Self::from_adapter(adapter, trusted, options.without_features, cache, coop)
    }

    fn from_adapter(
        adapter: wgpu::Adapter,
        trusted_shaders: bool,
        without_features: wgpu::Features,
        cache: Option<std::path::PathBuf>,
        cooperative_matrix: bool,
    ) -> Result<Device> {
        let info = adapter.get_info();
        let wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let mut features = adapter.features() & wanted & !without_features;
        let coop = cooperative_matrix
            && !without_features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && coop_f16_offered(&adapter, features);
        if coop {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        // The cache serves the timed mode only: the heuristic and cross-check modes start from
        // the heuristics.
        let mode = TuneMode::from_env();
        let cache = cache.filter(|_| mode == TuneMode::Timed);
        let key = tune_cache::adapter_key(&info, features);
        let tuned = match &cache {
            Some(path) => tune_cache::load(path, &key)?.choices,
            None => HashMap::new(),
        };
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: if coop {
                // SAFETY: wgpu asks callers of experimental features to accept that they may
                // misbehave; the one asked for here was opted into by the user
                // (`DeviceOptions::cooperative_matrix`), and kiln uses it only in
                // `matmul_coop16_*` on the configurations `coop_f16_offered` checked.
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice {
            adapter: describe(&info),
            reason: e.to_string(),
        })?;
        let gpu_error = Arc::new(Mutex::new(None));
        let slot = gpu_error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&slot).get_or_insert_with(|| e.to_string());
        }));
        let fault = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln fault"),
            size: 8,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let lost = Arc::new(Mutex::new(None));
        let lost_slot = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            lock(&lost_slot).get_or_insert_with(|| format!("{reason:?}: {message}"));
        });
        Ok(Device {
            inner: Arc::new(DeviceInner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                device,
                queue,
                info,
                limits,
                features,
                modules: Mutex::new(HashMap::new()),
                pipelines: Mutex::new(HashMap::new()),
                batch: Mutex::new(Batch {
                    encoder: None,
                    pass: None,
                    params: Vec::new(),
                    params_buffer: None,
                    dispatches: 0,
                }),
                pool: Mutex::new(Pool::default()),
                gpu_error,
                lost,
                fault,
                submits: AtomicU64::new(0),
                readbacks: AtomicU64::new(0),
                dispatches: AtomicU64::new(0),
                tune_mode: std::sync::atomic::AtomicU8::new(mode.code()),
                tune_cache: cache.map(|path| (path, key)),
                tune_cache_error: Mutex::new(None),
                tuned: Mutex::new(tuned),
                profile: Mutex::new(None),
                profiling: std::sync::atomic::AtomicBool::new(false),
                row_reduction: std::sync::atomic::AtomicU8::new(0),
                trusted_shaders,
                as_hardware: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The adapter's name, backend and type.
    pub fn name(&self) -> String {
        describe(&self.inner.info)
    }

    /// The adapter's description as wgpu reports it.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.inner.info
    }

    /// True on a CPU-based (software) adapter such as lavapipe, where kernels that avoid
    /// workgroup barriers and read vec4s are chosen (unless [`Device::choose_as_hardware`]).
    pub(crate) fn is_software(&self) -> bool {
        self.inner.info.device_type == wgpu::DeviceType::Cpu
            && !self.inner.as_hardware.load(Ordering::Relaxed)
    }

    /// Makes kernel choices as on a hardware adapter whatever this one is (for tests that run
    /// the hardware paths, autotuning included, on a software adapter).
    #[doc(hidden)]
    pub fn choose_as_hardware(&self, on: bool) {
        self.inner.as_hardware.store(on, Ordering::Relaxed);
    }

    /// True when the device was made with cooperative matrices for its f16 matmuls
    /// ([`DeviceOptions::cooperative_matrix`], on an adapter that offers them).
    ///
    /// ```
    /// let dev = kiln::Device::new(&kiln::DeviceOptions { cooperative_matrix: true, ..Default::default() })?;
    /// if dev.adapter_info().device_type == kiln::wgpu::DeviceType::Cpu {
    ///     assert!(!dev.has_cooperative_matrix()); // its f16 matmuls run on the usual kernels
    /// }
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn has_cooperative_matrix(&self) -> bool {
        self.inner
            .features
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    }

    /// True when the device has the `SUBGROUP` feature and every subgroup has at least `size`
    /// invocations (the adapter's minimum subgroup size). The subgroup matmul kernels need 8.
    ///
    /// ```
    /// let dev = kiln::Device::default_device()?;
    /// if dev.subgroups_of_at_least(8) {
    ///     assert!(dev.features().contains(kiln::wgpu::Features::SUBGROUP));
    /// }
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn subgroups_of_at_least(&self, size: u32) -> bool {
        self.inner.features.contains(wgpu::Features::SUBGROUP)
            && self.inner.info.subgroup_min_size >= size
    }

    /// The limits the device was created with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.inner.limits
    }

    /// The optional features enabled (a subset of SHADER_F16, SUBGROUP, TIMESTAMP_QUERY and,
    /// when asked for, EXPERIMENTAL_COOPERATIVE_MATRIX).
    pub fn features(&self) -> wgpu::Features {
        self.inner.features
    }

    /// True when both handles are the same device.
    pub fn same(&self, other: &Device) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The runtime counters.
    pub fn stats(&self) -> DeviceStats {
        let pool = lock(&self.inner.pool);
        DeviceStats {
            submits: self.inner.submits.load(Ordering::Relaxed),
            readbacks: self.inner.readbacks.load(Ordering::Relaxed),
            dispatches: self.inner.dispatches.load(Ordering::Relaxed),
            live_bytes: pool.live_bytes,
            peak_bytes: pool.peak_bytes,
            pooled_bytes: pool.pooled_bytes,
        }
    }

    /// Bytes of tensor storage in use now.
    pub fn live_bytes(&self) -> u64 {
        lock(&self.inner.pool).live_bytes
    }

    /// The most tensor storage in use at once so far.
    pub fn peak_bytes(&self) -> u64 {
        lock(&self.inner.pool).peak_bytes
    }

    /// Starts a new peak measurement from the current live bytes.
    pub fn reset_peak_bytes(&self) {
        let mut pool = lock(&self.inner.pool);
        pool.peak_bytes = pool.live_bytes;
    }

    /// Turns the kernel autotuner on or off (on by default; `KILN_AUTOTUNE=0` turns it off).
    /// When on, the first large matmul or convolution (forward or gradient) of each shape
    /// class times the candidate kernels once (a few synchronised runs) and remembers the
    /// fastest for this device.
    pub fn set_autotune(&self, on: bool) {
        self.set_tune_mode(if on {
            TuneMode::Timed
        } else {
            TuneMode::Heuristic
        });
    }

    /// Sets how kernels are chosen from now on (by default [`TuneMode::Timed`], or as
    /// `KILN_AUTOTUNE` says). Choices already made stay.
    ///
    /// ```
    /// use kiln::{Device, DeviceOptions, TuneMode};
    /// let dev = Device::new(&DeviceOptions::default())?;
    /// dev.set_tune_mode(TuneMode::CrossCheck);
    /// let a = kiln::Tensor::randn(&[33, 20], 0, &dev)?;
    /// let b = kiln::Tensor::randn(&[20, 12], 1, &dev)?;
    /// // Every matmul kernel that fits ran once, and each agreed with the heuristic's.
    /// assert_eq!(a.matmul(&b)?.dims(), &[33, 12]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn set_tune_mode(&self, mode: TuneMode) {
        self.inner.tune_mode.store(mode.code(), Ordering::Relaxed);
    }

    /// How kernels are chosen now.
    pub fn tune_mode(&self) -> TuneMode {
        TuneMode::of_code(self.inner.tune_mode.load(Ordering::Relaxed))
    }

    /// Why the last write of the tuner's cache file ([`DeviceOptions::tune_cache`]) failed, or
    /// `None` if it succeeded or none was due. A failed write fails no op: the timed choice is
    /// kept for this device, only not for later runs.
    ///
    /// ```
    /// let dev = kiln::Device::default_device()?;
    /// assert_eq!(dev.tune_cache_error(), None); // no cache file asked for
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn tune_cache_error(&self) -> Option<String> {
        lock(&self.inner.tune_cache_error).clone()
    }

    /// Turns per-kernel profiling on (clearing what was gathered) or off. While it is on, every
    /// dispatch runs alone: pending work is finished first, then the dispatch is submitted and
    /// waited for, and its wall-clock time (submission included) is added to its kernel's row.
    /// Work then runs far slower than usual, so profile a few steps, not a training run.
    ///
    /// ```
    /// # let dev = kiln::Device::new(&Default::default())?;
    /// dev.set_profiling(true);
    /// let x = kiln::Tensor::randn(&[64, 64], 1, &dev)?;
    /// x.matmul(&x)?.relu()?.to_vec()?;
    /// let table = dev.profile();
    /// assert!(table.iter().any(|k| k.kernel.starts_with("unary")));
    /// dev.set_profiling(false);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn set_profiling(&self, on: bool) {
        *lock(&self.inner.profile) = on.then(HashMap::new);
        self.inner.profiling.store(on, Ordering::Relaxed);
    }

    /// The profile gathered since [`Device::set_profiling`]: one row per kernel (the WGSL entry
    /// point, and its element types when not f32), most total time first.
    pub fn profile(&self) -> Vec<KernelTime> {
        let mut rows: Vec<KernelTime> = lock(&self.inner.profile)
            .as_ref()
            .map(|m| {
                m.iter()
                    .map(|(k, &(calls, seconds))| KernelTime {
                        kernel: k.clone(),
                        calls,
                        seconds,
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.sort_by(|a, b| {
            b.seconds
                .total_cmp(&a.seconds)
                .then(a.kernel.cmp(&b.kernel))
        });
        rows
    }

    fn profiling(&self) -> bool {
        self.inner.profiling.load(Ordering::Relaxed)
    }

    /// Forces the row-reduction kernel: `Some(true)` one invocation per row, `Some(false)` a
    /// workgroup per row, `None` the device's own choice (for tests that run both).
    #[doc(hidden)]
    pub fn force_row_reduction(&self, serial: Option<bool>) {
        let v = match serial {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.inner.row_reduction.store(v, Ordering::Relaxed);
    }

    pub(crate) fn row_reduction_override(&self) -> Option<bool> {
        match self.inner.row_reduction.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// The kernel chosen for `(family, shape class)`, if tuned.
    pub(crate) fn tuned(&self, family: Kernel, class: [u8; 4]) -> Option<Kernel> {
        lock(&self.inner.tuned).get(&(family, class)).copied()
    }

    /// Remembers a choice; after a timed one (`persist`) the cache file, if any, is rewritten
    /// with every choice remembered. A file that cannot be written is kept for
    /// [`Device::tune_cache_error`], not an `Err` of the op that was tuned: the choice stands.
    pub(crate) fn set_tuned(&self, family: Kernel, class: [u8; 4], choice: Kernel, persist: bool) {
        let choices = {
            let mut tuned = lock(&self.inner.tuned);
            tuned.insert((family, class), choice);
            match (&self.inner.tune_cache, persist) {
                (Some(_), true) => tuned.clone(),
                _ => return,
            }
        };
        if let Some((path, key)) = &self.inner.tune_cache {
            let saved = tune_cache::save(path, key, &choices);
            *lock(&self.inner.tune_cache_error) = saved.err().map(|e| e.to_string());
        }
    }

    /// The autotuner's choices so far: (family, shape class, kernel). The family is the
    /// candidate set: for matmul `MatmulFwd` for any layout, or the aligned layout's vec4
    /// kernel, with the class the log2 buckets of (m, n, k, batch), the top bit of the last set
    /// when the epilogue applies an activation; for convolutions (not tuned on software
    /// adapters) `Conv2dFwd`, `Conv2dBwdInput` or `Conv2dBwdWeight`, with the log2 buckets of
    /// their GEMM's (rows, columns, reduction length, groups).
    pub fn tuned_kernels(&self) -> Vec<(Kernel, [u8; 4], Kernel)> {
        lock(&self.inner.tuned)
            .iter()
            .map(|(&(f, c), &k)| (f, c, k))
            .collect()
    }

    /// Releases the buffers the pool keeps for reuse.
    pub fn trim_pool(&self) {
        lock(&self.inner.pool).trim();
    }

    /// Destroys the GPU device now, releasing its memory: every later call on it or its
    /// tensors is [`Error::DeviceLost`], as after a driver reset.
    ///
    /// ```
    /// let dev = kiln::Device::new(&Default::default())?;
    /// let t = kiln::Tensor::ones(&[3], &dev)?;
    /// dev.destroy();
    /// assert!(matches!(t.to_vec(), Err(kiln::Error::DeviceLost { .. })));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn destroy(&self) {
        lock(&self.inner.lost).get_or_insert_with(|| "destroyed".to_string());
        self.inner.device.destroy();
    }

    /// The fault words kernels set on bad data (see `DeviceInner::fault`).
    pub(crate) fn fault_buffer(&self) -> &wgpu::Buffer {
        &self.inner.fault
    }

    /// `Err(DeviceLost)` once the device is lost.
    pub(crate) fn alive(&self, op: &'static str) -> Result<()> {
        match &*lock(&self.inner.lost) {
            Some(reason) => Err(Error::DeviceLost {
                op,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Submits pending work and waits until the GPU has finished it.
    pub fn synchronize(&self) -> Result<()> {
        self.alive("synchronize")?;
        {
            let mut batch = lock(&self.inner.batch);
            self.submit_locked(&mut batch, None);
        }
        self.wait(None)?;
        self.check_error()
    }

    /// Largest tensor buffer a kernel can bind, in bytes.
    pub(crate) fn max_binding_bytes(&self) -> u64 {
        self.inner
            .limits
            .max_storage_buffer_binding_size
            .min(self.inner.limits.max_buffer_size)
    }

    fn check_error(&self) -> Result<()> {
        match lock(&self.inner.gpu_error).take() {
            Some(e) => Err(Error::Gpu(e)),
            None => Ok(()),
        }
    }

    /// Waits for the submission `index` (`None`: all submitted work).
    fn wait(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.inner
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map(|_| ())
            .map_err(|e| Error::Gpu(e.to_string()))
    }

    /// A storage buffer of at least `bytes` (a multiple of 4), from the pool when possible.
    /// `for_upload`: the caller will fill it with `queue.write_buffer`.
    pub(crate) fn alloc(
        &self,
        op: &'static str,
        bytes: u64,
        kind: BufferKind,
        for_upload: bool,
    ) -> Result<(wgpu::Buffer, u64)> {
        self.alive(op)?;
        let limit = match kind {
            BufferKind::Storage => self.max_binding_bytes(),
            _ => self.inner.limits.max_buffer_size,
        };
        if bytes > limit {
            return Err(Error::TooLarge {
                op,
                bytes: bytes as u128,
                limit,
            });
        }
        let class = size_class(bytes, limit);
        let mut pool = lock(&self.inner.pool);
        if let Some(buf) = pool.take(kind, class, for_upload) {
            return Ok((buf, class));
        }
        drop(pool);
        // An allocation the GPU cannot satisfy is an Err (after giving the pool's idle buffers
        // back once), not a later validation failure.
        let create = || {
            let scope = self
                .inner
                .device
                .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            let buffer = self.inner.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: class,
                usage: kind.usages(),
                mapped_at_creation: false,
            });
            (buffer, pollster::block_on(scope.pop()))
        };
        let buffer = match create() {
            (buffer, None) => buffer,
            (_, Some(_)) => {
                self.trim_pool();
                match create() {
                    (buffer, None) => buffer,
                    (_, Some(e)) => {
                        return Err(Error::Gpu(format!(
                            "{op}: out of GPU memory for {class} bytes ({e})"
                        )))
                    }
                }
            }
        };
        lock(&self.inner.pool).note_live(kind, class);
        Ok((buffer, class))
    }

    /// Returns a buffer to the pool.
    pub(crate) fn release(&self, kind: BufferKind, class: u64, buffer: wgpu::Buffer) {
        lock(&self.inner.pool).give(kind, class, buffer);
    }

    /// Writes host data into a buffer obtained with `alloc(.., for_upload = true)`.
    pub(crate) fn upload(&self, buffer: &wgpu::Buffer, data: &[u8]) {
        if !data.is_empty() && self.alive("upload").is_ok() {
            self.inner.queue.write_buffer(buffer, 0, data);
        }
    }

    fn pipeline(&self, kernel: Kernel, variant: Variant) -> Result<Arc<Pipeline>> {
        if let Some(p) = lock(&self.inner.pipelines).get(&(kernel, variant)) {
            return Ok(p.clone());
        }
        let file = kernel.file();
        if file.needs_subgroups() && !self.subgroups_of_at_least(8) {
            return Err(Error::invalid(
                "dispatch",
                format!(
                    "{} needs subgroups of 8 or more invocations, which {} does not have",
                    kernel.entry(),
                    self.name()
                ),
            ));
        }
        if file.needs_cooperative_matrix() && !self.has_cooperative_matrix() {
            return Err(Error::invalid(
                "dispatch",
                format!(
                    "{} needs cooperative matrices (DeviceOptions::cooperative_matrix, on an \
                     adapter with 16x16x16 f16 products into f32 and 32-wide subgroups), which \
                     {} does not have",
                    kernel.entry(),
                    self.name()
                ),
            ));
        }
        let module = {
            let mut modules = lock(&self.inner.modules);
            match modules.get(&(file, variant)) {
                Some(m) => m.clone(),
                None => {
                    let source = file.variant_source(variant).ok_or_else(|| {
                        Error::invalid(
                            "dispatch",
                            format!("{} has no {variant:?} variant", file.file_name()),
                        )
                    })?;
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(file.file_name()),
                        source: wgpu::ShaderSource::Wgsl(source.into()),
                    };
                    let m = if self.inner.trusted_shaders {
                        let checks = wgpu::ShaderRuntimeChecks {
                            bounds_checks: false,
                            force_loop_bounding: false,
                            ..wgpu::ShaderRuntimeChecks::checked()
                        };
                        // SAFETY: every buffer index in kiln's kernels is derived from shapes,
                        // strides and offsets that the launch code checked against the
                        // buffers' sizes before recording the dispatch, and loops are bounded
                        // by uniform sizes. The user asked for this mode explicitly.
                        unsafe { self.inner.device.create_shader_module_trusted(desc, checks) }
                    } else {
                        self.inner.device.create_shader_module(desc)
                    };
                    modules.insert((file, variant), m.clone());
                    m
                }
            }
        };
        let pipeline =
            self.inner
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.entry()),
                    layout: None,
                    module: &module,
                    entry_point: Some(kernel.entry()),
                    compilation_options: wgpu::PipelineCompilationOptions::default(),
                    cache: None,
                });
        let layout = pipeline.get_bind_group_layout(0);
        let p = Arc::new(Pipeline { pipeline, layout });
        lock(&self.inner.pipelines).insert((kernel, variant), p.clone());
        Ok(p)
    }

    /// Records one dispatch of `kernel` into the open batch.
    ///
    /// `inputs` are bound at `0..inputs.len()`, `output` at binding 3 and a copy of `params`
    /// (which belongs to this dispatch alone) at binding 4.
    pub(crate) fn dispatch(
        &self,
        kernel: Kernel,
        inputs: &[&wgpu::Buffer],
        output: &wgpu::Buffer,
        params: &[u8],
        workgroups: [u32; 3],
    ) {
        self.dispatch_outputs(kernel, inputs, &[output], params, workgroups)
    }

    /// [`Device::dispatch`] with several read-write buffers, bound at 3, 5, 6 and 7 (for
    /// in-place kernels such as the optimizers).
    pub(crate) fn dispatch_outputs(
        &self,
        kernel: Kernel,
        inputs: &[&wgpu::Buffer],
        outputs: &[&wgpu::Buffer],
        params: &[u8],
        workgroups: [u32; 3],
    ) {
        // F32 exists for every kernel, and kernels that need subgroups go through
        // dispatch_variant: this cannot fail.
        debug_assert!(
            !kernel.file().needs_subgroups() && !kernel.file().needs_cooperative_matrix()
        );
        let _ = self.dispatch_variant(kernel, Variant::F32, inputs, outputs, params, workgroups);
    }

    /// [`Device::dispatch_outputs`] of one element-type variant of the kernel. `Err` when the
    /// variant does not exist or needs a feature the device lacks.
    pub(crate) fn dispatch_variant(
        &self,
        kernel: Kernel,
        variant: Variant,
        inputs: &[&wgpu::Buffer],
        outputs: &[&wgpu::Buffer],
        params: &[u8],
        workgroups: [u32; 3],
    ) -> Result<()> {
        self.alive("dispatch")?;
        if variant.needs_f16() && !self.inner.features.contains(wgpu::Features::SHADER_F16) {
            return Err(Error::invalid(
                "dispatch",
                format!(
                    "{variant:?} kernels need SHADER_F16, which {} lacks",
                    self.name()
                ),
            ));
        }
        debug_assert_eq!(inputs.len(), kernel.inputs());
        debug_assert!(params.len() <= PARAMS_STRIDE);
        debug_assert!(!outputs.is_empty() && outputs.len() <= OUTPUT_BINDINGS.len());
        if workgroups.contains(&0) {
            return Ok(());
        }
        let profiling = self.profiling();
        let start = if profiling {
            // Whatever is pending runs first, outside this dispatch's time.
            self.synchronize()?;
            Some(std::time::Instant::now())
        } else {
            None
        };
        let pipeline = self.pipeline(kernel, variant)?;
        let mut batch = lock(&self.inner.batch);
        if batch.pass.is_none() {
            self.open_pass(&mut batch);
        }
        let params_buffer = match &batch.params_buffer {
            Some(b) => b.clone(),
            None => {
                let size = (MAX_BATCH_DISPATCHES * PARAMS_STRIDE) as u64;
                let (buffer, _) = self.alloc("dispatch", size, BufferKind::Uniform, true)?;
                batch.params_buffer = Some(buffer.clone());
                buffer
            }
        };
        let offset = batch.params.len();
        batch.params.extend_from_slice(params);
        batch.params.resize(offset + PARAMS_STRIDE, 0);

        let mut entries: Vec<wgpu::BindGroupEntry> = inputs
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        for (&binding, buffer) in OUTPUT_BINDINGS.iter().zip(outputs) {
            entries.push(wgpu::BindGroupEntry {
                binding,
                resource: buffer.as_entire_binding(),
            });
        }
        entries.push(wgpu::BindGroupEntry {
            binding: PARAMS_BINDING,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &params_buffer,
                offset: offset as u64,
                size: wgpu::BufferSize::new(params.len() as u64),
            }),
        });
        let bind_group = self
            .inner
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.layout,
                entries: &entries,
            });
        if let Some(pass) = batch.pass.as_mut() {
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        batch.dispatches += 1;
        self.inner.dispatches.fetch_add(1, Ordering::Relaxed);
        if batch.dispatches >= MAX_BATCH_DISPATCHES {
            self.submit_locked(&mut batch, None);
        }
        if let Some(start) = start {
            drop(batch);
            self.synchronize()?;
            let name = match variant {
                Variant::F32 => kernel.entry().to_string(),
                v => format!("{} ({v:?})", kernel.entry()),
            };
            if let Some(m) = lock(&self.inner.profile).as_mut() {
                let row = m.entry(name).or_insert((0, 0.0));
                row.0 += 1;
                row.1 += start.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }

    fn open_pass(&self, batch: &mut Batch) {
        let mut encoder =
            self.inner
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("kiln batch"),
                });
        let pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            })
            .forget_lifetime();
        batch.encoder = Some(encoder);
        batch.pass = Some(pass);
        lock(&self.inner.pool).batch_open = true;
    }

    /// Ends the open pass, lets `extra` record into the encoder (a readback copy), and submits.
    /// Returns the submission's index, `None` when nothing was submitted.
    fn submit_locked(
        &self,
        batch: &mut Batch,
        extra: Option<&dyn Fn(&mut wgpu::CommandEncoder)>,
    ) -> Option<wgpu::SubmissionIndex> {
        batch.pass = None;
        if self.alive("submit").is_err() {
            // A lost device runs nothing: the recorded work is dropped.
            batch.encoder = None;
            batch.params.clear();
            batch.dispatches = 0;
            return None;
        }
        if batch.encoder.is_none() && extra.is_none() {
            return None;
        }
        let mut encoder = batch.encoder.take().unwrap_or_else(|| {
            self.inner
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("kiln readback"),
                })
        });
        if let Some(record) = extra {
            record(&mut encoder);
        }
        if let Some(params_buffer) = batch.params_buffer.take() {
            self.inner
                .queue
                .write_buffer(&params_buffer, 0, &batch.params);
            let class = params_buffer.size();
            self.release(BufferKind::Uniform, class, params_buffer);
        }
        batch.params.clear();
        batch.dispatches = 0;
        let index = self.inner.queue.submit(Some(encoder.finish()));
        self.inner.submits.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.pool).batch_submitted();
        Some(index)
    }

    /// Copies `bytes` bytes at `offset` of `buffer` to the host, submitting pending work first.
    pub(crate) fn read_buffer<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<T>> {
        self.start_read(&[(buffer, offset, bytes)])?.wait()
    }

    /// Submits pending work with copies of `regions` (buffer, offset, bytes; multiples of 4)
    /// into one staging buffer, and starts mapping it; [`PendingRead::wait`] returns the
    /// regions' bytes one after another. The GPU runs the work while the host goes on
    /// recording.
    pub(crate) fn start_read(&self, regions: &[(&wgpu::Buffer, u64, u64)]) -> Result<PendingRead> {
        self.alive("read")?;
        let bytes: u64 = regions.iter().map(|r| r.2).sum();
        if bytes == 0 {
            return Ok(PendingRead {
                device: self.clone(),
                staging: None,
                bytes: 0,
            });
        }
        // The data and, after it, the fault words (which are then cleared), in one map.
        let total = bytes.div_ceil(8) * 8 + 8;
        let (staging, class) = self.alloc("read", total, BufferKind::Readback, false)?;
        let fault = &self.inner.fault;
        let index = {
            let mut batch = lock(&self.inner.batch);
            self.submit_locked(
                &mut batch,
                Some(&|enc: &mut wgpu::CommandEncoder| {
                    let mut at = 0;
                    for &(buffer, offset, n) in regions {
                        enc.copy_buffer_to_buffer(buffer, offset, &staging, at, n);
                        at += n;
                    }
                    enc.copy_buffer_to_buffer(fault, 0, &staging, total - 8, 8);
                    enc.clear_buffer(fault, 0, None);
                }),
            )
        };
        self.inner.readbacks.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..total, move |r| {
            // The receiver lives as long as the staging buffer; a failed send cannot happen.
            let _ = sender.send(r);
        });
        Ok(PendingRead {
            device: self.clone(),
            staging: Some(Staging {
                buffer: staging,
                class,
                total,
                index,
                receiver,
            }),
            bytes,
        })
    }
}

/// A readback in flight (from `Device::start_read`).
pub(crate) struct PendingRead {
    device: Device,
    staging: Option<Staging>,
    bytes: u64,
}

struct Staging {
    buffer: wgpu::Buffer,
    class: u64,
    total: u64,
    index: Option<wgpu::SubmissionIndex>,
    receiver: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

impl PendingRead {
    /// Waits for the copies and returns their contents as elements of `T` (copied once out of
    /// the mapped staging buffer).
    pub(crate) fn wait<T: bytemuck::Pod>(mut self) -> Result<Vec<T>> {
        let Some(s) = self.staging.take() else {
            return Ok(Vec::new());
        };
        let dev = &self.device;
        let (bytes, total) = (self.bytes, s.total);
        // Another thread's poll may be the one that runs the callback, slightly after our own
        // poll returns: keep polling until it has arrived.
        let mapped = loop {
            dev.wait(s.index.clone())?;
            match s.receiver.recv_timeout(std::time::Duration::from_millis(1)) {
                Ok(r) => break Some(r),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break None,
            }
        };
        let out = match mapped {
            Some(Ok(())) => {
                let data = s
                    .buffer
                    .get_mapped_range(0..total)
                    .map_err(|e| Error::Gpu(format!("reading back {bytes} bytes: {e}")))
                    .and_then(|view| {
                        let words = &view[(total - 8) as usize..];
                        let code = u32::from_le_bytes(words[..4].try_into().unwrap_or_default());
                        let value = f32::from_le_bytes(words[4..].try_into().unwrap_or_default());
                        if code != 0 {
                            return Err(Error::invalid(
                                "index_select",
                                format!(
                                    "an index_select, gather or embedding since the last readback got index {value}, which is not an integer in range; its output holds zeros there"
                                ),
                            ));
                        }
                        Ok(bytemuck::pod_collect_to_vec(&view[..bytes as usize]))
                    });
                s.buffer.unmap();
                data
            }
            Some(Err(e)) => Err(Error::Gpu(format!(
                "mapping {bytes} bytes for readback: {e}"
            ))),
            None => Err(Error::Gpu("readback did not complete".into())),
        };
        dev.release(BufferKind::Readback, s.class, s.buffer);
        dev.check_error()?;
        out
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Device#{}({})",
            self.inner.id,
            describe(&self.inner.info)
        )
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(&self.inner.info))
    }
}
