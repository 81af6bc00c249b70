//! Checkpoints in the safetensors format: a module's parameters and buffers under their
//! PyTorch `state_dict` names (so PyTorch's `safetensors.torch.load_file` +
//! `load_state_dict(strict=True)` reads them and kiln reads PyTorch's), with the optimizer's
//! state, step count and learning rate in a file of its own beside it ([`optimizer_path`]).
//! Loading is strict by default; [`load_with`] loads what matches and reports the missing and
//! unexpected names, as `load_state_dict(strict=False)` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::nn::{Module, TensorRole};
use crate::optim::Optimizer;
use crate::tensor::Tensor;

/// Prefix of optimizer state in files of earlier kiln versions, which kept it in the weights
/// file (still read).
const OPTIMIZER_PREFIX: &str = "optimizer.";
/// Metadata keys of the optimizer file.
const STEPS_KEY: &str = "kiln.optimizer.steps";
const LR_KEY: &str = "kiln.optimizer.lr";
/// Metadata key of the architecture description.
const SPEC_KEY: &str = "kiln.spec";
/// PyTorch stores this counter as int64.
const COUNTER: &str = "num_batches_tracked";

fn io(op: &'static str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        op,
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Where [`save`] puts the optimizer state of a checkpoint at `path`: beside it, with
/// `.optimizer` before the extension (`model.safetensors` -> `model.optimizer.safetensors`).
/// The weights file then holds exactly the model's state dict, so PyTorch's
/// `load_state_dict(strict=True)` reads it.
pub fn optimizer_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let ext = path
        .extension()
        .map_or(String::new(), |e| format!(".{}", e.to_string_lossy()));
    path.with_file_name(format!("{stem}.optimizer{ext}"))
}

/// Writes `bytes_of(writer)` to `path` through a synced `.partial` file beside it: an error
/// or a crash midway leaves the old file whole. Returns the partial file's path, to be
/// renamed by `commit`.
fn write_partial(
    op: &'static str,
    path: &Path,
    write: &dyn Fn(&mut dyn std::io::Write) -> Result<()>,
) -> Result<PathBuf> {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    let tmp = PathBuf::from(name);
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| io(op, &tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w).map_err(|e| match e {
            Error::InvalidArgument { msg, .. } => io(op, &tmp, msg),
            other => other,
        })?;
        let file = w.into_inner().map_err(|e| io(op, &tmp, e))?;
        file.sync_all().map_err(|e| io(op, &tmp, e))
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes `bytes` to `path` through a synced `.partial` file, so that an error midway leaves
/// any old file whole.
pub(crate) fn write_atomic(op: &'static str, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_partial(op, path, &|w| {
        w.write_all(bytes)
            .map_err(|e| Error::invalid(op, e.to_string()))
    })?;
    std::fs::rename(&tmp, path).map_err(|e| io(op, path, e))
}

/// Saves `model`'s state dict to `path`, and `optimizer`'s state (its tensors, step count and
/// learning rate) to [`optimizer_path`]`(path)` if given; without one, a stale optimizer file
/// from an earlier save is removed. With `spec`, the architecture description
/// ([`crate::spec`]) is stored in the weights file's metadata under `kiln.spec`, so
/// [`crate::infer`] can rebuild the model from the file alone. Each file is streamed (the host
/// holds one tensor at a time) and replaces the old one only once written whole.
///
/// ```
/// use kiln::nn::{Init, Linear, Module};
/// # let dev = kiln::Device::default_device()?;
/// let net = Linear::new(&mut Init::new(&dev, 0), 3, 2, true)?;
/// let path = std::env::temp_dir().join("kiln-doc-linear.safetensors");
/// kiln::checkpoint::save(&path, &net, None, Some("linear(3,2)"))?;
/// let copy = Linear::new(&mut Init::new(&dev, 1), 3, 2, true)?;
/// kiln::checkpoint::load(&path, &copy, None)?;
/// assert_eq!(copy.weight.to_vec()?, net.weight.to_vec()?);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn save(
    path: &Path,
    model: &dyn Module,
    optimizer: Option<&dyn Optimizer>,
    spec: Option<&str>,
) -> Result<()> {
    const OP: &str = "checkpoint::save";
    let opt_path = optimizer_path(path);
    let opt_tmp = match optimizer {
        Some(opt) => Some(write_partial(OP, &opt_path, &|w| {
            write_entries(w, optimizer_entries(opt), &optimizer_metadata(opt))
        })?),
        None => None,
    };
    let weights_tmp = match write_partial(OP, path, &|w| {
        write_entries(w, model_entries(model), &spec_metadata(spec))
    }) {
        Ok(t) => t,
        Err(e) => {
            if let Some(t) = &opt_tmp {
                let _ = std::fs::remove_file(t);
            }
            return Err(e);
        }
    };
    match &opt_tmp {
        Some(t) => std::fs::rename(t, &opt_path).map_err(|e| io(OP, &opt_path, e))?,
        None => match std::fs::remove_file(&opt_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(OP, &opt_path, e));
            }
            _ => {}
        },
    }
    std::fs::rename(&weights_tmp, path).map_err(|e| io(OP, path, e))
}

/// The bytes of the weights file [`save`] writes.
pub fn to_bytes(model: &dyn Module, spec: Option<&str>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_entries(&mut out, model_entries(model), &spec_metadata(spec))?;
    Ok(out)
}

/// The bytes of the optimizer file [`save`] writes.
pub fn optimizer_to_bytes(optimizer: &dyn Optimizer) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_entries(
        &mut out,
        optimizer_entries(optimizer),
        &optimizer_metadata(optimizer),
    )?;
    Ok(out)
}

/// Saves named tensors (any names, any shapes) to a safetensors file, as
/// `safetensors.torch.save_file` does; [`load_tensors`] reads them back.
///
/// ```
/// # let dev = kiln::Device::default_device()?;
/// let a = kiln::Tensor::from_slice(&[1.0, 2.0, 3.0], &[3], &dev)?;
/// let path = std::env::temp_dir().join("kiln-doc-tensors.safetensors");
/// kiln::checkpoint::save_tensors(&path, &[("a", &a)])?;
/// let back = kiln::checkpoint::load_tensors(&path, &dev)?;
/// assert_eq!(back["a"].to_vec()?, vec![1.0, 2.0, 3.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn save_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    const OP: &str = "checkpoint::save_tensors";
    let entries = || {
        tensors
            .iter()
            .map(|(n, t)| Entry {
                name: n.to_string(),
                dtype: Dtype::F32,
                tensor: (*t).clone(),
            })
            .collect()
    };
    let tmp = write_partial(OP, path, &|w| write_entries(w, entries(), &[]))?;
    std::fs::rename(&tmp, path).map_err(|e| io(OP, path, e))
}

/// Every tensor of a safetensors file (as [`read`] converts them), on `device`.
pub fn load_tensors(path: &Path, device: &crate::Device) -> Result<BTreeMap<String, Tensor>> {
    read(path)?
        .into_iter()
        .map(|(n, s)| Ok((n, Tensor::from_slice(&s.values, &s.shape, device)?)))
        .collect()
}

fn model_entries(model: &dyn Module) -> Vec<Entry> {
    model
        .state_dict()
        .into_iter()
        .map(|(name, tensor, _)| Entry {
            dtype: if name.ends_with(COUNTER) {
                Dtype::I64
            } else {
                Dtype::F32
            },
            name,
            tensor,
        })
        .collect()
}

fn optimizer_entries(opt: &dyn Optimizer) -> Vec<Entry> {
    opt.state()
        .into_iter()
        .map(|(name, tensor)| Entry {
            name,
            dtype: Dtype::F32,
            tensor,
        })
        .collect()
}

fn spec_metadata(spec: Option<&str>) -> Vec<(&'static str, String)> {
    spec.map(|s| (SPEC_KEY, s.to_string()))
        .into_iter()
        .collect()
}

fn optimizer_metadata(opt: &dyn Optimizer) -> Vec<(&'static str, String)> {
    vec![
        (STEPS_KEY, opt.steps().to_string()),
        // The shortest decimal that reads back to the same f32.
        (LR_KEY, opt.lr().to_string()),
    ]
}

/// One tensor of a checkpoint, before its data is read.
struct Entry {
    name: String,
    dtype: Dtype,
    tensor: Tensor,
}

/// Writes a safetensors file: the header (as the safetensors crate lays it out: metadata
/// first, then tensors by descending dtype and name, padded to 8 bytes), then each tensor's
/// data, read from the GPU one tensor at a time.
fn write_entries(
    w: &mut dyn std::io::Write,
    mut entries: Vec<Entry>,
    metadata: &[(&'static str, String)],
) -> Result<()> {
    const OP: &str = "checkpoint::save";
    entries.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    if let Some(pair) = entries.windows(2).find(|p| p[0].name == p[1].name) {
        return Err(Error::invalid(
            OP,
            format!("tensor {} appears twice", pair[0].name),
        ));
    }
    // JSON text of a name or a shape.
    let text = |s: &str| serde_json::Value::from(s).to_string();
    let dims = |d: &[usize]| serde_json::Value::from(d.to_vec()).to_string();
    let mut header = String::from("{");
    if !metadata.is_empty() {
        let mut meta: Vec<_> = metadata.to_vec();
        meta.sort();
        let fields: Vec<String> = meta
            .iter()
            .map(|(k, v)| format!("{}:{}", text(k), text(v)))
            .collect();
        header.push_str(&format!("\"__metadata__\":{{{}}},", fields.join(",")));
    }
    let mut offset = 0usize;
    for (k, e) in entries.iter().enumerate() {
        let size = if e.dtype == Dtype::I64 { 8 } else { 4 };
        let end = offset + e.tensor.numel() * size;
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{:?}\",\"shape\":{},\"data_offsets\":[{offset},{end}]}}{}",
            text(&e.name),
            e.dtype,
            dims(e.tensor.dims()),
            if k + 1 < entries.len() { "," } else { "" }
        ));
        offset = end;
    }
    if header.ends_with(',') {
        header.pop();
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let put = |w: &mut dyn std::io::Write, b: &[u8]| {
        w.write_all(b)
            .map_err(|e| Error::invalid(OP, e.to_string()))
    };
    put(w, &(header.len() as u64).to_le_bytes())?;
    put(w, header.as_bytes())?;
    for e in &entries {
        let values = e.tensor.to_vec()?;
        if e.dtype == Dtype::I64 {
            let b: Vec<u8> = values
                .iter()
                .flat_map(|&x| (x as i64).to_le_bytes())
                .collect();
            put(w, &b)?;
        } else {
            put(w, bytemuck::cast_slice(&values))?;
        }
    }
    Ok(())
}

/// A tensor read from a checkpoint: shape and values (as f32).
#[derive(Clone, Debug)]
pub struct StoredTensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub values: Vec<f32>,
}

/// Every tensor of a safetensors file by name (F32, F64, F16, BF16 and integer tensors are
/// converted to f32). A truncated or corrupt file is an error.
pub fn read(path: &Path) -> Result<BTreeMap<String, StoredTensor>> {
    let bytes = std::fs::read(path).map_err(|e| io("checkpoint::read", path, e))?;
    from_bytes(&bytes).map_err(|e| match e {
        Error::InvalidArgument { msg, .. } => io("checkpoint::read", path, msg),
        other => other,
    })
}

/// [`read`] from memory.
pub fn from_bytes(bytes: &[u8]) -> Result<BTreeMap<String, StoredTensor>> {
    const OP: &str = "checkpoint::read";
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::invalid(OP, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            other => {
                return Err(Error::invalid(
                    OP,
                    format!("tensor {name} has unsupported dtype {other:?}"),
                ))
            }
        };
        out.insert(
            name,
            StoredTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok(out)
}

/// The architecture description stored by [`save`], if any.
pub fn read_spec(path: &Path) -> Result<Option<String>> {
    let bytes = std::fs::read(path).map_err(|e| io("checkpoint::read_spec", path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        io(
            "checkpoint::read_spec",
            path,
            format!("not a valid safetensors file: {e}"),
        )
    })?;
    Ok(meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(SPEC_KEY).cloned()))
}

/// Options of [`load_with`].
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// A model tensor missing from the file, or a file tensor the model lacks, is an error
    /// (PyTorch's `strict=True`, the default). When false, what matches is loaded and the
    /// rest is reported. A tensor of another shape is an error either way, as in PyTorch.
    pub strict: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { strict: true }
    }
}

/// What a non-strict [`load_with`] did not load, as PyTorch's `load_state_dict` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Model tensors the file does not have (left as they were).
    pub missing: Vec<String>,
    /// File tensors the model does not have (ignored).
    pub unexpected: Vec<String>,
}

/// An optimizer file: the state tensors by name, the step count and the learning rate.
#[derive(Clone)]
pub struct OptimizerState {
    /// State tensors as [`Optimizer::state`] names them.
    pub tensors: BTreeMap<String, StoredTensor>,
    /// Steps taken when saved (absent in files of earlier kiln versions).
    pub steps: Option<u64>,
    /// Learning rate when saved (absent in files of earlier kiln versions).
    pub lr: Option<f32>,
}

/// Reads an optimizer file written by [`save`].
pub fn read_optimizer(path: &Path) -> Result<OptimizerState> {
    let bytes = std::fs::read(path).map_err(|e| io("checkpoint::read_optimizer", path, e))?;
    optimizer_from_bytes(&bytes).map_err(|e| match e {
        Error::InvalidArgument { msg, .. } => io("checkpoint::read_optimizer", path, msg),
        other => other,
    })
}

/// [`read_optimizer`] from memory.
pub fn optimizer_from_bytes(bytes: &[u8]) -> Result<OptimizerState> {
    const OP: &str = "checkpoint::read_optimizer";
    let tensors = from_bytes(bytes)?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::invalid(OP, format!("not a valid safetensors file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let steps = meta
        .get(STEPS_KEY)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| Error::invalid(OP, format!("{STEPS_KEY} = {v:?} is not a step count")))
        })
        .transpose()?;
    let lr = meta
        .get(LR_KEY)
        .map(|v| match v.parse::<f32>() {
            Ok(lr) if lr.is_finite() && lr >= 0.0 => Ok(lr),
            _ => Err(Error::invalid(
                OP,
                format!("{LR_KEY} = {v:?} is not a learning rate"),
            )),
        })
        .transpose()?;
    Ok(OptimizerState { tensors, steps, lr })
}

/// Loads a checkpoint into `model`'s tensors, and, if `optimizer` is given, the optimizer
/// file beside it ([`optimizer_path`]) into the optimizer: its state, step count and learning
/// rate. Strict: a tensor missing from the file, an extra one, or one of another shape is an
/// error naming it, and nothing is written unless everything matches.
pub fn load(path: &Path, model: &dyn Module, optimizer: Option<&mut dyn Optimizer>) -> Result<()> {
    load_with(path, model, optimizer, &LoadOptions::default()).map(|_| ())
}

/// [`load`] with options: with `strict: false`, the tensors whose names match are loaded and
/// the others reported, as PyTorch's `load_state_dict(strict=False)` does (for example to
/// fine-tune a pretrained body under a new head). Still all or nothing: on `Err` nothing is
/// written.
///
/// ```
/// use kiln::checkpoint::{self, LoadOptions};
/// use kiln::nn::{Init, Linear, Module, Sequential};
/// # let dev = kiln::Device::default_device()?;
/// let mut init = Init::new(&dev, 0);
/// let pretrained = Sequential::new()
///     .add_named("body", Linear::new(&mut init, 4, 8, true)?)
///     .add_named("head", Linear::new(&mut init, 8, 10, true)?);
/// let path = std::env::temp_dir().join("kiln-doc-finetune.safetensors");
/// checkpoint::save(&path, &pretrained, None, None)?;
/// let model = Sequential::new()
///     .add_named("body", Linear::new(&mut init, 4, 8, true)?)
///     .add_named("new_head", Linear::new(&mut init, 8, 3, true)?);
/// let report = checkpoint::load_with(&path, &model, None, &LoadOptions { strict: false })?;
/// assert_eq!(report.missing, ["new_head.bias", "new_head.weight"]);
/// assert_eq!(report.unexpected, ["head.bias", "head.weight"]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn load_with(
    path: &Path,
    model: &dyn Module,
    optimizer: Option<&mut dyn Optimizer>,
    options: &LoadOptions,
) -> Result<LoadReport> {
    const OP: &str = "checkpoint::load";
    let stored = read(path)?;
    let Some(opt) = optimizer else {
        return load_stored(&stored, model, None, options);
    };
    let opt_path = optimizer_path(path);
    let state = if opt_path.exists() {
        read_optimizer(&opt_path)?
    } else if stored.keys().any(|k| k.starts_with(OPTIMIZER_PREFIX)) {
        // A file of an earlier kiln version, with the optimizer state inside.
        OptimizerState {
            tensors: stored
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(OPTIMIZER_PREFIX)
                        .map(|k| (k.to_string(), v.clone()))
                })
                .collect(),
            steps: None,
            lr: None,
        }
    } else {
        return Err(io(
            OP,
            &opt_path,
            "an optimizer was given but there is no optimizer state beside the checkpoint",
        ));
    };
    load_stored(&stored, model, Some((&state, opt)), options)
}

/// [`load_with`] from tensors already read (`stored`, as [`read`] returns them) and, for the
/// optimizer, an optimizer file already read.
pub fn load_stored(
    stored: &BTreeMap<String, StoredTensor>,
    model: &dyn Module,
    optimizer: Option<(&OptimizerState, &mut dyn Optimizer)>,
    options: &LoadOptions,
) -> Result<LoadReport> {
    const OP: &str = "checkpoint::load";
    let state = model.state_dict();
    let mut report = LoadReport::default();
    for (name, t, _) in &state {
        let Some(s) = stored.get(name) else {
            if options.strict {
                return Err(Error::invalid(
                    OP,
                    format!("tensor {name} is missing from the checkpoint"),
                ));
            }
            report.missing.push(name.clone());
            continue;
        };
        if s.shape != t.dims() {
            return Err(Error::shape(
                OP,
                format!(
                    "tensor {name} has shape {:?} in the checkpoint, {:?} in the model",
                    s.shape,
                    t.dims()
                ),
            ));
        }
    }
    let known: std::collections::HashSet<&str> = state.iter().map(|(n, _, _)| n.as_str()).collect();
    for extra in stored
        .keys()
        .filter(|k| !k.starts_with(OPTIMIZER_PREFIX) && !known.contains(k.as_str()))
    {
        if options.strict {
            return Err(Error::invalid(
                OP,
                format!("tensor {extra} in the checkpoint is not in the model"),
            ));
        }
        report.unexpected.push(extra.clone());
    }
    report.missing.sort();
    // All or nothing: every tensor is uploaded and checked before anything is written.
    let mut model_values = Vec::with_capacity(state.len());
    for (name, t, role) in &state {
        if let Some(s) = stored.get(name) {
            model_values.push((t, Tensor::from_slice(&s.values, &s.shape, t.device())?));
        }
        debug_assert!(matches!(role, TensorRole::Parameter | TensorRole::Buffer));
    }
    let mut opt_values = Vec::new();
    if let Some((saved, opt)) = &optimizer {
        let device = opt.params().first().map(|p| p.device().clone());
        if let (None, Some(name)) = (&device, saved.tensors.keys().next()) {
            return Err(Error::invalid(
                OP,
                format!("the optimizer has no parameters to take the stored state {name}"),
            ));
        }
        for (name, s) in &saved.tensors {
            let Some(device) = &device else { break };
            let t = Tensor::from_slice(&s.values, &s.shape, device)?;
            opt.check_state(name, &t)?;
            opt_values.push((name.as_str(), t));
        }
    }
    for (t, src) in &model_values {
        t.assign(src)?;
    }
    if let Some((saved, opt)) = optimizer {
        for (key, t) in &opt_values {
            opt.set_state(key, t)?;
        }
        if let Some(steps) = saved.steps {
            opt.set_steps(steps);
        }
        if let Some(lr) = saved.lr {
            opt.set_lr(lr);
        }
    }
    Ok(report)
}
