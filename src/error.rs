//! The one error type of the crate.

/// Everything that can go wrong in kiln.
///
/// Shape, axis, size and device errors are raised on the CPU before any GPU work is recorded,
/// and each names the operation and the offending values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No GPU adapter matched (or none exists at all).
    #[error("no GPU adapter found{filter}; adapters seen: [{found}]. {hint}")]
    NoAdapter {
        /// ` matching KILN_ADAPTER="..."`, or empty when no filter was given.
        filter: String,
        /// The adapters that were enumerated, as `name (backend, type)`.
        found: String,
        /// How to get one.
        hint: &'static str,
    },

    /// The adapter refused to create a device.
    #[error("could not create a device on adapter {adapter}: {reason}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// wgpu's message.
        reason: String,
    },

    /// Shapes that do not fit the operation.
    #[error("{op}: {msg}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What was wrong, with the shapes.
        msg: String,
    },

    /// An axis outside `-rank..rank`.
    #[error("{op}: axis {axis} is out of range for a tensor of rank {rank}")]
    Axis {
        /// The operation.
        op: &'static str,
        /// The axis given.
        axis: isize,
        /// The rank of the tensor.
        rank: usize,
    },

    /// A tensor too large for the device's buffer or binding limits.
    #[error("{op}: tensor of {bytes} bytes exceeds the device limit of {limit} bytes")]
    TooLarge {
        /// The operation.
        op: &'static str,
        /// Bytes requested.
        bytes: u128,
        /// The device limit.
        limit: u64,
    },

    /// Tensors of two different devices mixed in one operation.
    #[error("{op}: tensors live on different devices ({a} and {b})")]
    DeviceMismatch {
        /// The operation.
        op: &'static str,
        /// Device of the first operand.
        a: String,
        /// Device of the other operand.
        b: String,
    },

    /// An argument outside its valid range (other than shapes and axes).
    #[error("{op}: {msg}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },

    /// Reading or writing a file failed.
    #[error("{op}: {path}: {message}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },

    /// A collective operation between data-parallel ranks failed: a peer stopped answering
    /// within the timeout, reported an error, or the ranks disagree (see [`crate::dist`]).
    #[error("{op}: {msg}")]
    Communication {
        /// The operation.
        op: &'static str,
        /// What went wrong, with the ranks and values involved.
        msg: String,
    },

    /// The GPU reported an error (out of memory, a failed mapping).
    #[error("GPU error: {0}")]
    Gpu(String),

    /// The device was lost (a driver reset, an unplugged GPU, or [`crate::Device::destroy`]):
    /// every later call on it and its tensors is this error. Make a new `Device` to go on.
    #[error("{op}: the GPU device was lost ({reason})")]
    DeviceLost {
        /// The operation.
        op: &'static str,
        /// Why, as the driver said.
        reason: String,
    },
}

/// `Result` with kiln's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
}
