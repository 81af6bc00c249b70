//! Checkpoints in the safetensors format: a module's parameters and buffers under their
//! PyTorch `state_dict` names (so PyTorch's `safetensors.torch.load_file` +
//! `load_state_dict` reads them and kiln reads PyTorch's), optionally with optimizer state
//! under `optimizer.`.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::nn::{Module, TensorRole};
use crate::optim::Optimizer;
use crate::tensor::Tensor;

const OPTIMIZER_PREFIX: &str = "optimizer.";
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

/// Saves `model`'s state dict (and `optimizer`'s state, if given) to `path`. With `spec`, the
/// architecture description ([`crate::spec`]) is stored in the file's metadata under
/// `kiln.spec`, so [`crate::infer`] can rebuild the model from the file alone.
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
    let bytes = to_bytes(model, optimizer, spec)?;
    std::fs::write(path, bytes).map_err(|e| io("checkpoint::save", path, e))
}

/// The bytes [`save`] writes.
pub fn to_bytes(
    model: &dyn Module,
    optimizer: Option<&dyn Optimizer>,
    spec: Option<&str>,
) -> Result<Vec<u8>> {
    let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t, _) in model.state_dict() {
        let values = t.to_vec()?;
        if name.ends_with(COUNTER) {
            let v: Vec<u8> = values
                .iter()
                .flat_map(|&x| (x as i64).to_le_bytes())
                .collect();
            entries.push((name, Dtype::I64, t.shape(), v));
        } else {
            entries.push((
                name,
                Dtype::F32,
                t.shape(),
                bytemuck::cast_slice(&values).to_vec(),
            ));
        }
    }
    if let Some(opt) = optimizer {
        for (name, t) in opt.state() {
            let values = t.to_vec()?;
            entries.push((
                format!("{OPTIMIZER_PREFIX}{name}"),
                Dtype::F32,
                t.shape(),
                bytemuck::cast_slice(&values).to_vec(),
            ));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(n, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::invalid("checkpoint::save", format!("{n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let metadata = spec.map(|s| {
        [(SPEC_KEY.to_string(), s.to_string())]
            .into_iter()
            .collect()
    });
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::invalid("checkpoint::save", e.to_string()))
}

/// A tensor read from a checkpoint: shape and values (as f32).
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

/// Loads a checkpoint into `model`'s tensors (and `optimizer`'s state, if given), strictly:
/// a tensor missing from the file, an extra one, or one of another shape is an error naming
/// it, and nothing is written unless everything matches.
pub fn load(path: &Path, model: &dyn Module, optimizer: Option<&mut dyn Optimizer>) -> Result<()> {
    let stored = read(path)?;
    load_stored(&stored, model, optimizer)
}

/// [`load`] from tensors already read.
pub fn load_stored(
    stored: &BTreeMap<String, StoredTensor>,
    model: &dyn Module,
    optimizer: Option<&mut dyn Optimizer>,
) -> Result<()> {
    const OP: &str = "checkpoint::load";
    let state = model.state_dict();
    for (name, t, _) in &state {
        let s = stored.get(name).ok_or_else(|| {
            Error::invalid(OP, format!("tensor {name} is missing from the checkpoint"))
        })?;
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
    if let Some(extra) = stored
        .keys()
        .find(|k| !k.starts_with(OPTIMIZER_PREFIX) && !known.contains(k.as_str()))
    {
        return Err(Error::invalid(
            OP,
            format!("tensor {extra} in the checkpoint is not in the model"),
        ));
    }
    // All or nothing: every tensor is uploaded and checked before anything is written.
    let mut model_values = Vec::with_capacity(state.len());
    for (name, t, role) in &state {
        let s = &stored[name];
        model_values.push(Tensor::from_slice(&s.values, &s.shape, t.device())?);
        debug_assert!(matches!(role, TensorRole::Parameter | TensorRole::Buffer));
    }
    let mut opt_values = Vec::new();
    if let Some(opt) = &optimizer {
        let entries: Vec<_> = stored
            .iter()
            .filter(|(k, _)| k.starts_with(OPTIMIZER_PREFIX))
            .collect();
        let device = opt.params().first().map(|p| p.device().clone());
        if let (None, Some((name, _))) = (&device, entries.first()) {
            return Err(Error::invalid(
                OP,
                format!("the optimizer has no parameters to take the stored state {name}"),
            ));
        }
        for (name, s) in entries {
            let Some(device) = &device else { break };
            let key = &name[OPTIMIZER_PREFIX.len()..];
            let t = Tensor::from_slice(&s.values, &s.shape, device)?;
            opt.check_state(key, &t)?;
            opt_values.push((key, t));
        }
    }
    for ((_, t, _), src) in state.iter().zip(&model_values) {
        t.assign(src)?;
    }
    if let Some(opt) = optimizer {
        for (key, t) in &opt_values {
            opt.set_state(key, t)?;
        }
    }
    Ok(())
}
