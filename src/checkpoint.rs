//! Checkpoints in the safetensors format: a module's parameters and buffers under their
//! PyTorch `state_dict` names (so PyTorch's `safetensors.torch.load_file` +
//! `load_state_dict` reads them and kiln reads PyTorch's), optionally with optimizer state
//! under `optimizer.`.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

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
    const OP: &str = "checkpoint::save";
    // Streamed (the host holds one tensor at a time) into a file beside the target, renamed
    // over it at the end: an error or a crash midway leaves the old checkpoint whole.
    let tmp = path.with_extension("safetensors.partial");
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| io(OP, &tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        write_to(&mut w, model, optimizer, spec).map_err(|e| match e {
            Error::InvalidArgument { msg, .. } => io(OP, &tmp, msg),
            other => other,
        })?;
        let file = w.into_inner().map_err(|e| io(OP, &tmp, e))?;
        file.sync_all().map_err(|e| io(OP, &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(OP, path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The bytes [`save`] writes.
pub fn to_bytes(
    model: &dyn Module,
    optimizer: Option<&dyn Optimizer>,
    spec: Option<&str>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_to(&mut out, model, optimizer, spec)?;
    Ok(out)
}

/// One tensor of a checkpoint, before its data is read.
struct Entry {
    name: String,
    dtype: Dtype,
    tensor: Tensor,
}

/// Writes the safetensors file: the header (as the safetensors crate lays it out: metadata
/// first, then tensors by descending dtype and name, padded to 8 bytes), then each tensor's
/// data, read from the GPU one tensor at a time.
fn write_to(
    w: &mut dyn std::io::Write,
    model: &dyn Module,
    optimizer: Option<&dyn Optimizer>,
    spec: Option<&str>,
) -> Result<()> {
    const OP: &str = "checkpoint::save";
    let mut entries: Vec<Entry> = model
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
        .collect();
    if let Some(opt) = optimizer {
        entries.extend(opt.state().into_iter().map(|(name, tensor)| Entry {
            name: format!("{OPTIMIZER_PREFIX}{name}"),
            dtype: Dtype::F32,
            tensor,
        }));
    }
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
    if let Some(s) = spec {
        header.push_str(&format!("\"__metadata__\":{{\"{SPEC_KEY}\":{}}},", text(s)));
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
