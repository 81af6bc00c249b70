//! Data: the [`Dataset`] trait, an in-memory dataset, a [`DataLoader`] with seeded shuffling,
//! an IDX (MNIST) reader, and the UCI 8x8 handwritten digits embedded in the crate.

mod idx;

use std::sync::Arc;

pub use idx::{mnist, read_idx};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A dataset: features, and either a class label per sample (classification, the default) or
/// a target tensor per sample (regression, per-token or multi-label targets: implement
/// [`Dataset::target_shape`] and [`Dataset::read_target`], as [`TensorDataset`] does).
pub trait Dataset {
    /// Number of samples.
    fn len(&self) -> usize;

    /// True without samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape of one sample's features, e.g. `[1, 28, 28]`.
    fn feature_shape(&self) -> Vec<usize>;

    /// Number of classes; labels must be below it.
    fn num_classes(&self) -> usize;

    /// Appends sample `index`'s features to `features` and returns its label (any value,
    /// such as 0, for a dataset of tensor targets).
    fn read(&self, index: usize, features: &mut Vec<f32>) -> Result<usize>;

    /// The shape of one sample's target tensor, for a dataset of tensor targets; `None` (the
    /// default) for class labels.
    fn target_shape(&self) -> Option<Vec<usize>> {
        None
    }

    /// Appends sample `index`'s target values to `target` (a dataset of tensor targets).
    fn read_target(&self, index: usize, target: &mut Vec<f32>) -> Result<()> {
        let _ = (index, target);
        Err(Error::invalid(
            "Dataset::read_target",
            "this dataset has class labels, not tensor targets",
        ))
    }
}

/// Samples with a target tensor each (regression, per-token or multi-label targets), held in
/// memory.
///
/// ```
/// use kiln::data::{DataLoader, Dataset, TensorDataset};
/// # let dev = kiln::Device::default_device()?;
/// // 3 samples of 2 features, each with a target of shape [1].
/// let d = TensorDataset::new(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], &[2], vec![0.5, 1.5, 2.5], &[1])?;
/// let batch = DataLoader::new(&d, 2, &dev).epoch(0).next().unwrap()?;
/// assert_eq!(batch.targets.dims(), &[2, 1]);
/// assert_eq!(batch.targets.to_vec()?, vec![0.5, 1.5]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub struct TensorDataset {
    features: Arc<Vec<f32>>,
    targets: Arc<Vec<f32>>,
    shape: Vec<usize>,
    target_shape: Vec<usize>,
    indices: Option<Arc<Vec<usize>>>,
}

impl TensorDataset {
    /// Samples whose features (each of `shape`) and targets (each of `target_shape`) are
    /// concatenated in `features` and `targets`.
    pub fn new(
        features: Vec<f32>,
        shape: &[usize],
        targets: Vec<f32>,
        target_shape: &[usize],
    ) -> Result<TensorDataset> {
        const OP: &str = "TensorDataset";
        let (per, per_t) = (
            shape.iter().product::<usize>(),
            target_shape.iter().product::<usize>(),
        );
        if per == 0 || per_t == 0 || !features.len().is_multiple_of(per) {
            return Err(Error::shape(
                OP,
                format!(
                    "{} features do not make samples of shape {shape:?}",
                    features.len()
                ),
            ));
        }
        let n = features.len() / per;
        if targets.len() != n * per_t {
            return Err(Error::shape(
                OP,
                format!(
                    "{n} samples with targets of shape {target_shape:?} need {} target values, got {}",
                    n * per_t,
                    targets.len()
                ),
            ));
        }
        Ok(TensorDataset {
            features: Arc::new(features),
            targets: Arc::new(targets),
            shape: shape.to_vec(),
            target_shape: target_shape.to_vec(),
            indices: None,
        })
    }

    fn source_index(&self, i: usize) -> usize {
        self.indices.as_ref().map_or(i, |ix| ix[i])
    }

    /// A seeded random split: the first part holds `fraction` of the samples.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(TensorDataset, TensorDataset)> {
        let view = |ix: Vec<usize>| TensorDataset {
            indices: Some(Arc::new(ix)),
            ..self.clone()
        };
        let (a, b) = split_order(self.len(), |i| self.source_index(i), fraction, seed)?;
        Ok((view(a), view(b)))
    }

    fn check(&self, index: usize) -> Result<usize> {
        if index >= self.len() {
            return Err(Error::invalid(
                "read",
                format!("sample {index} of a dataset of {}", self.len()),
            ));
        }
        Ok(self.source_index(index))
    }
}

impl Dataset for TensorDataset {
    fn len(&self) -> usize {
        let per: usize = self.shape.iter().product();
        self.indices
            .as_ref()
            .map_or(self.features.len() / per, |ix| ix.len())
    }

    fn feature_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// Tensor targets have no classes.
    fn num_classes(&self) -> usize {
        0
    }

    fn read(&self, index: usize, features: &mut Vec<f32>) -> Result<usize> {
        let i = self.check(index)?;
        let per: usize = self.shape.iter().product();
        features.extend_from_slice(&self.features[i * per..(i + 1) * per]);
        Ok(0)
    }

    fn target_shape(&self) -> Option<Vec<usize>> {
        Some(self.target_shape.clone())
    }

    fn read_target(&self, index: usize, target: &mut Vec<f32>) -> Result<()> {
        let i = self.check(index)?;
        let per: usize = self.target_shape.iter().product();
        target.extend_from_slice(&self.targets[i * per..(i + 1) * per]);
        Ok(())
    }
}

/// Samples held in memory, shared cheaply between splits.
///
/// ```
/// use kiln::data::{Dataset, InMemoryDataset};
/// let d = InMemoryDataset::new(vec![0.0; 12], vec![0, 1, 1], &[2, 2], 2)?;
/// let (train, test) = d.split(2.0 / 3.0, 0)?;
/// assert_eq!((train.len(), test.len()), (2, 1));
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub struct InMemoryDataset {
    features: Arc<Vec<f32>>,
    labels: Arc<Vec<usize>>,
    shape: Vec<usize>,
    classes: usize,
    /// The samples of this view (all when `None`).
    indices: Option<Arc<Vec<usize>>>,
}

impl InMemoryDataset {
    /// `labels.len()` samples whose features (each of `shape`) are concatenated in `features`.
    /// Every label must be below `classes`.
    pub fn new(
        features: Vec<f32>,
        labels: Vec<usize>,
        shape: &[usize],
        classes: usize,
    ) -> Result<InMemoryDataset> {
        const OP: &str = "InMemoryDataset";
        let per: usize = shape.iter().product();
        if features.len() != per * labels.len() {
            return Err(Error::shape(
                OP,
                format!(
                    "{} labels of shape {shape:?} need {} features, got {}",
                    labels.len(),
                    per * labels.len(),
                    features.len()
                ),
            ));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= classes) {
            return Err(Error::invalid(
                OP,
                format!("label {l} of sample {i} is out of range for {classes} classes"),
            ));
        }
        Ok(InMemoryDataset {
            features: Arc::new(features),
            labels: Arc::new(labels),
            shape: shape.to_vec(),
            classes,
            indices: None,
        })
    }

    fn source_index(&self, i: usize) -> usize {
        self.indices.as_ref().map_or(i, |ix| ix[i])
    }

    /// A seeded random split: the first part holds `fraction` of the samples.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(InMemoryDataset, InMemoryDataset)> {
        let view = |ix: Vec<usize>| InMemoryDataset {
            indices: Some(Arc::new(ix)),
            ..self.clone()
        };
        let (a, b) = split_order(self.len(), |i| self.source_index(i), fraction, seed)?;
        Ok((view(a), view(b)))
    }

    /// The label of sample `i`.
    pub fn label(&self, i: usize) -> usize {
        self.labels[self.source_index(i)]
    }
}

impl Dataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.indices
            .as_ref()
            .map_or(self.labels.len(), |ix| ix.len())
    }

    fn feature_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn read(&self, index: usize, features: &mut Vec<f32>) -> Result<usize> {
        if index >= self.len() {
            return Err(Error::invalid(
                "read",
                format!("sample {index} of a dataset of {}", self.len()),
            ));
        }
        let i = self.source_index(index);
        let per: usize = self.shape.iter().product();
        features.extend_from_slice(&self.features[i * per..(i + 1) * per]);
        Ok(self.labels[i])
    }
}

/// The source indices of a view's `len` samples, shuffled from `seed` and cut at `fraction`.
fn split_order(
    len: usize,
    source_index: impl Fn(usize) -> usize,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::invalid(
            "split",
            format!("fraction must be in [0, 1], got {fraction}"),
        ));
    }
    let mut order: Vec<usize> = (0..len).map(source_index).collect();
    shuffle(&mut order, seed);
    let cut = (order.len() as f64 * fraction).round() as usize;
    let second = order.split_off(cut);
    Ok((order, second))
}

/// SplitMix64-driven Fisher-Yates shuffle.
fn shuffle(v: &mut [usize], seed: u64) {
    let mut state = seed ^ 0x5851_f42d_4c95_7f2d;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// One batch on the GPU.
pub struct Batch {
    /// (batch, *feature_shape)
    pub inputs: Tensor,
    /// (batch) class indices as f32, for the losses; or (batch, *target_shape) for a dataset
    /// of tensor targets.
    pub targets: Tensor,
    /// The class labels on the host (empty for tensor targets).
    pub labels: Vec<usize>,
    /// Samples in the batch.
    pub len: usize,
}

/// Batches of a dataset, optionally shuffled with a seed (a new order each epoch).
///
/// ```
/// use kiln::data::{DataLoader, InMemoryDataset};
/// # let dev = kiln::Device::default_device()?;
/// let d = InMemoryDataset::new((0..20).map(|v| v as f32).collect(), (0..10).map(|i| i % 3).collect(), &[2], 3)?;
/// let loader = DataLoader::new(&d, 4, &dev).shuffle(1).drop_last(true);
/// let batches: Vec<_> = loader.epoch(0).collect::<Result<_, _>>()?;
/// assert_eq!(batches.len(), 2);
/// assert_eq!(batches[0].inputs.dims(), &[4, 2]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct DataLoader<'a> {
    dataset: &'a dyn Dataset,
    batch_size: usize,
    seed: Option<u64>,
    drop_last: bool,
    /// (rank, world): this loader yields slice `rank` of `world` of every batch.
    shard: (usize, usize),
    device: Device,
}

impl<'a> DataLoader<'a> {
    /// Batches of `batch_size` in dataset order, the last one possibly smaller.
    pub fn new(dataset: &'a dyn Dataset, batch_size: usize, device: &Device) -> DataLoader<'a> {
        DataLoader {
            dataset,
            batch_size: batch_size.max(1),
            seed: None,
            drop_last: false,
            shard: (0, 1),
            device: device.clone(),
        }
    }

    /// Shuffles every epoch, from `seed` and the epoch number.
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Drops a last batch smaller than the batch size.
    pub fn drop_last(mut self, drop: bool) -> Self {
        self.drop_last = drop;
        self
    }

    /// Yields only part `rank` of `world` of every batch, for data-parallel training: each
    /// batch of `batch_size` (the global batch) is cut into `world` contiguous slices, sizes
    /// differing by at most one, and this loader yields slice `rank`. Every rank shuffles with
    /// the same seed and epoch, so the ranks' slices together are exactly the batches of the
    /// unsharded loader, and every rank has the same number of batches ([`DataLoader::len`]).
    ///
    /// ```
    /// use kiln::data::{DataLoader, InMemoryDataset};
    /// # let dev = kiln::Device::default_device()?;
    /// let d = InMemoryDataset::new((0..10).map(|v| v as f32).collect(), vec![0; 10], &[1], 1)?;
    /// let whole = DataLoader::new(&d, 4, &dev).shuffle(7);
    /// let halves = [0, 1].map(|r| DataLoader::new(&d, 4, &dev).shuffle(7).shard(r, 2));
    /// let [a, b] = halves.map(|l| l.and_then(|l| l.epoch(3).next().unwrap()));
    /// let mut joined = a?.inputs.to_vec()?;
    /// joined.extend(b?.inputs.to_vec()?);
    /// assert_eq!(joined, whole.epoch(3).next().unwrap()?.inputs.to_vec()?);
    /// assert!(DataLoader::new(&d, 4, &dev).shard(2, 2).is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn shard(mut self, rank: usize, world: usize) -> Result<Self> {
        if rank >= world {
            return Err(Error::invalid(
                "DataLoader::shard",
                format!("rank {rank} is out of range for a world of {world}"),
            ));
        }
        self.shard = (rank, world);
        Ok(self)
    }

    /// Number of batches per epoch.
    pub fn len(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// True when an epoch has no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dataset.
    pub fn dataset(&self) -> &dyn Dataset {
        self.dataset
    }

    /// The batches of epoch `epoch`, uploaded to the device as they are produced.
    pub fn epoch(&self, epoch: usize) -> impl Iterator<Item = Result<Batch>> + '_ {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if let Some(seed) = self.seed {
            shuffle(
                &mut order,
                seed.wrapping_add((epoch as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)),
            );
        }
        let batches = self.len();
        (0..batches).map(move |b| {
            let idx = &order[b * self.batch_size..((b + 1) * self.batch_size).min(order.len())];
            let (rank, world) = self.shard;
            self.make_batch(&idx[rank * idx.len() / world..(rank + 1) * idx.len() / world])
        })
    }

    fn make_batch(&self, indices: &[usize]) -> Result<Batch> {
        let shape = self.dataset.feature_shape();
        let mut batch_shape = vec![indices.len()];
        batch_shape.extend(&shape);
        if let Some(target_shape) = self.dataset.target_shape() {
            let mut features = Vec::with_capacity(indices.len() * shape.iter().product::<usize>());
            let mut targets = Vec::new();
            for &i in indices {
                self.dataset.read(i, &mut features)?;
                self.dataset.read_target(i, &mut targets)?;
            }
            let mut target_dims = vec![indices.len()];
            target_dims.extend(&target_shape);
            return Ok(Batch {
                inputs: Tensor::from_slice(&features, &batch_shape, &self.device)?,
                targets: Tensor::from_slice(&targets, &target_dims, &self.device)?,
                labels: Vec::new(),
                len: indices.len(),
            });
        }
        let classes = self.dataset.num_classes();
        let mut features = Vec::with_capacity(indices.len() * shape.iter().product::<usize>());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let label = self.dataset.read(i, &mut features)?;
            if label >= classes {
                return Err(Error::invalid(
                    "DataLoader",
                    format!("label {label} of sample {i} is out of range for {classes} classes"),
                ));
            }
            labels.push(label);
        }
        let targets: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
        Ok(Batch {
            inputs: Tensor::from_slice(&features, &batch_shape, &self.device)?,
            targets: Tensor::from_slice(&targets, &[labels.len()], &self.device)?,
            len: labels.len(),
            labels,
        })
    }
}

/// The UCI ML optical recognition of handwritten digits test set as shipped by scikit-learn
/// (1797 samples of 1x8x8 pixels, values 0..16 scaled to 0..1, 10 classes), embedded in the
/// crate. Source and licence: `data/digits/README.md`.
///
/// ```
/// use kiln::data::Dataset;
/// let d = kiln::data::digits()?;
/// assert_eq!((d.len(), d.feature_shape(), d.num_classes()), (1797, vec![1, 8, 8], 10));
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn digits() -> Result<InMemoryDataset> {
    const RAW: &[u8] = include_bytes!("../../data/digits/digits.bin");
    const RECORD: usize = 65;
    if !RAW.len().is_multiple_of(RECORD) {
        return Err(Error::invalid("digits", "embedded data is corrupt"));
    }
    let n = RAW.len() / RECORD;
    let mut features = Vec::with_capacity(n * 64);
    let mut labels = Vec::with_capacity(n);
    for rec in RAW.chunks_exact(RECORD) {
        features.extend(rec[..64].iter().map(|&v| v as f32 / 16.0));
        labels.push(rec[64] as usize);
    }
    InMemoryDataset::new(features, labels, &[1, 8, 8], 10)
}
