//! Buffer pool: size classes, reuse on drop, live and peak byte counters.

use std::collections::HashMap;

/// What a pooled buffer is used for; each kind has its own free lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BufferKind {
    /// Tensor storage: STORAGE | COPY_SRC | COPY_DST.
    Storage,
    /// Per-batch kernel parameters: UNIFORM | COPY_DST.
    Uniform,
    /// Readback staging: MAP_READ | COPY_DST.
    Readback,
}

impl BufferKind {
    pub(crate) fn usages(self) -> wgpu::BufferUsages {
        use wgpu::BufferUsages as U;
        match self {
            BufferKind::Storage => U::STORAGE | U::COPY_SRC | U::COPY_DST,
            BufferKind::Uniform => U::UNIFORM | U::COPY_DST,
            BufferKind::Readback => U::MAP_READ | U::COPY_DST,
        }
    }
}

/// Smallest pooled buffer, in bytes.
const MIN_CLASS: u64 = 256;

/// The size class that a request of `bytes` is served from: powers of two up to 1 MiB, then
/// steps of an eighth of the enclosing power of two (at most 12.5% waste), never above `cap`
/// unless the request itself is.
pub(crate) fn size_class(bytes: u64, cap: u64) -> u64 {
    let bytes = bytes.max(MIN_CLASS);
    let pow = bytes.next_power_of_two();
    let class = if pow <= 1 << 20 {
        pow
    } else {
        let step = pow / 8;
        bytes.div_ceil(step) * step
    };
    let aligned = bytes.div_ceil(4) * 4;
    if class > cap {
        aligned.max(cap.min(class))
    } else {
        class
    }
}

/// Free buffers by (kind, class), plus the counters.
///
/// A buffer released while a batch of recorded work is still open may still be read or written
/// by that batch. Kernels can reuse it at once (dispatches in one pass run in order), but a
/// `queue.write_buffer` lands before the whole batch, so host uploads only take buffers that
/// were released with no batch open (`free`), never those in `recent`.
#[derive(Default)]
pub(crate) struct Pool {
    free: HashMap<(BufferKind, u64), Vec<wgpu::Buffer>>,
    recent: HashMap<(BufferKind, u64), Vec<wgpu::Buffer>>,
    pub(crate) batch_open: bool,
    pub(crate) live_bytes: u64,
    pub(crate) peak_bytes: u64,
    pub(crate) pooled_bytes: u64,
}

impl Pool {
    /// A free buffer of `class`, if any. `for_upload` excludes buffers the open batch may use.
    pub(crate) fn take(
        &mut self,
        kind: BufferKind,
        class: u64,
        for_upload: bool,
    ) -> Option<wgpu::Buffer> {
        let key = (kind, class);
        let mut buf = self.free.get_mut(&key).and_then(Vec::pop);
        if buf.is_none() && !for_upload {
            buf = self.recent.get_mut(&key).and_then(Vec::pop);
        }
        if buf.is_some() {
            self.pooled_bytes -= class;
            self.note_live(kind, class);
        }
        buf
    }

    /// Counts a buffer handed out (new or reused).
    pub(crate) fn note_live(&mut self, kind: BufferKind, class: u64) {
        if kind == BufferKind::Storage {
            self.live_bytes += class;
            self.peak_bytes = self.peak_bytes.max(self.live_bytes);
        }
    }

    /// Takes back a buffer handed out earlier.
    pub(crate) fn give(&mut self, kind: BufferKind, class: u64, buffer: wgpu::Buffer) {
        if kind == BufferKind::Storage {
            self.live_bytes -= class;
        }
        self.pooled_bytes += class;
        let lists = if self.batch_open {
            &mut self.recent
        } else {
            &mut self.free
        };
        lists.entry((kind, class)).or_default().push(buffer);
    }

    /// The open batch was submitted: everything released during it is safe for uploads.
    pub(crate) fn batch_submitted(&mut self) {
        self.batch_open = false;
        for (key, mut bufs) in self.recent.drain() {
            self.free.entry(key).or_default().append(&mut bufs);
        }
    }

    /// Drops every cached buffer that is not in use.
    pub(crate) fn trim(&mut self) {
        self.free.clear();
        self.recent.clear();
        self.pooled_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_with_bounded_waste() {
        assert_eq!(size_class(1, u64::MAX), 256);
        assert_eq!(size_class(257, u64::MAX), 512);
        assert_eq!(size_class(1 << 20, u64::MAX), 1 << 20);
        let c = size_class((1 << 20) + 1, u64::MAX);
        assert!(c > (1 << 20) && c <= (1 << 20) + (1 << 18));
        for bytes in [3_000_000u64, 77_777_777, 1 << 27] {
            let c = size_class(bytes, u64::MAX);
            assert!(
                c >= bytes && (c as f64) <= bytes as f64 * 1.125 + 1.0,
                "{bytes} -> {c}"
            );
        }
        // Never above the binding limit when the request fits under it.
        assert_eq!(size_class(120 << 20, 128 << 20), 128 << 20);
        assert_eq!(size_class((127 << 20) + 4, 128 << 20), 128 << 20);
    }
}
