//! Shapes, strides and broadcasting: pure CPU code.

use crate::error::{Error, Result};

/// The highest rank a kernel accepts (strides travel to the GPU in fixed arrays).
pub const MAX_RANK: usize = 8;

/// Row-major strides (in elements) of a contiguous tensor of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1usize;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.saturating_mul(d.max(1));
    }
    strides
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Turns a possibly negative axis into an index in `0..rank`.
pub fn normalize_axis(op: &'static str, axis: isize, rank: usize) -> Result<usize> {
    let r = rank as isize;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(Error::Axis { op, axis, rank });
    }
    Ok(a as usize)
}

/// Normalises a list of axes, rejecting duplicates. An empty list means every axis.
pub fn normalize_axes(op: &'static str, axes: &[isize], rank: usize) -> Result<Vec<usize>> {
    if axes.is_empty() {
        return Ok((0..rank).collect());
    }
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = normalize_axis(op, a, rank)?;
        if out.contains(&n) {
            return Err(Error::invalid(
                op,
                format!("axis {a} given twice in {axes:?}"),
            ));
        }
        out.push(n);
    }
    out.sort_unstable();
    Ok(out)
}

/// NumPy broadcasting of two shapes.
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::shape(
                op,
                format!(
                    "shapes {a:?} and {b:?} cannot be broadcast together (axis {i}: {da} vs {db})"
                ),
            ));
        };
    }
    Ok(out)
}

/// Where a tensor's elements sit in its buffer: shape, strides (in elements) and offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Size of each axis.
    pub shape: Vec<usize>,
    /// Step in elements between neighbours along each axis (0 for a broadcast axis).
    pub strides: Vec<usize>,
    /// Index of the first element in the buffer.
    pub offset: usize,
}

impl Layout {
    /// A contiguous row-major layout starting at element 0.
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout {
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: 0,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rank (number of axes).
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// True when elements are dense and in row-major order (size-1 axes may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// One past the largest buffer index this layout touches (0 when empty).
    pub fn span(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// Buffer index of the element at `index` (row-major position in the logical shape).
    pub fn index_of(&self, mut index: usize) -> usize {
        let mut off = self.offset;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d > 0 {
                off += (index % d) * s;
                index /= d;
            }
        }
        off
    }

    /// This layout broadcast to `target` (new leading axes and size-1 axes get stride 0).
    pub fn broadcast_to(&self, op: &'static str, target: &[usize]) -> Result<Layout> {
        // Kernels index elements with u32: a view may not hold more, nor overflow usize.
        if target.len() > MAX_RANK || checked_numel(target).is_none_or(|n| n > u32::MAX as usize) {
            return Err(Error::shape(
                op,
                format!(
                    "{target:?} has rank above {MAX_RANK} or more than {} elements",
                    u32::MAX
                ),
            ));
        }
        if target.len() < self.rank() {
            return Err(Error::shape(
                op,
                format!("cannot broadcast shape {:?} to {:?}", self.shape, target),
            ));
        }
        let lead = target.len() - self.rank();
        let mut strides = vec![0; target.len()];
        for (i, &t) in target.iter().enumerate() {
            if i < lead {
                continue;
            }
            let d = self.shape[i - lead];
            if d == t {
                strides[i] = self.strides[i - lead];
            } else if d != 1 {
                return Err(Error::shape(
                    op,
                    format!("cannot broadcast shape {:?} to {:?}", self.shape, target),
                ));
            }
        }
        Ok(Layout {
            shape: target.to_vec(),
            strides,
            offset: self.offset,
        })
    }

    /// Axes reordered: axis `i` of the result is axis `perm[i]` of `self`.
    pub fn permute(&self, op: &'static str, perm: &[usize]) -> Result<Layout> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if perm.len() != rank
            || perm
                .iter()
                .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::shape(
                op,
                format!(
                    "{perm:?} is not a permutation of the {rank} axes of {:?}",
                    self.shape
                ),
            ));
        }
        Ok(Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// `len` elements of `axis` starting at `start`.
    pub fn narrow(
        &self,
        op: &'static str,
        axis: usize,
        start: usize,
        len: usize,
    ) -> Result<Layout> {
        let d = self.shape[axis];
        if start.checked_add(len).is_none_or(|end| end > d) {
            return Err(Error::shape(
                op,
                format!(
                    "range {start}..{} is outside axis {axis} of size {d} (shape {:?})",
                    start.saturating_add(len),
                    self.shape
                ),
            ));
        }
        let mut out = self.clone();
        out.shape[axis] = len;
        if len > 0 {
            out.offset += start * self.strides[axis];
        }
        Ok(out)
    }

    /// Drops axes of size one whose index is in `axes` (all of them when `axes` is `None`).
    pub fn squeeze(&self, axes: Option<&[usize]>) -> Layout {
        let keep = |i: usize| self.shape[i] != 1 || axes.is_some_and(|a| !a.contains(&i));
        Layout {
            shape: (0..self.rank())
                .filter(|&i| keep(i))
                .map(|i| self.shape[i])
                .collect(),
            strides: (0..self.rank())
                .filter(|&i| keep(i))
                .map(|i| self.strides[i])
                .collect(),
            offset: self.offset,
        }
    }

    /// Inserts an axis of size one before `axis` (`axis` may equal the rank).
    pub fn unsqueeze(&self, axis: usize) -> Layout {
        let mut out = self.clone();
        let stride = if axis < self.rank() {
            self.strides[axis] * self.shape[axis]
        } else {
            1
        };
        out.shape.insert(axis, 1);
        out.strides.insert(axis, stride);
        out
    }
}

/// Resolves a requested shape that may hold one `-1` against `numel` elements.
pub fn resolve_shape(op: &'static str, requested: &[isize], numel: usize) -> Result<Vec<usize>> {
    let mut infer = None;
    let mut known = 1usize;
    for (i, &d) in requested.iter().enumerate() {
        if d == -1 {
            if infer.replace(i).is_some() {
                return Err(Error::shape(
                    op,
                    format!("more than one -1 in {requested:?}"),
                ));
            }
        } else if d < 0 {
            return Err(Error::shape(op, format!("negative size in {requested:?}")));
        } else {
            known = known
                .checked_mul(d as usize)
                .ok_or_else(|| Error::shape(op, format!("{requested:?} overflows")))?;
        }
    }
    let mut out: Vec<usize> = requested.iter().map(|&d| d.max(0) as usize).collect();
    if let Some(i) = infer {
        if known == 0 || !numel.is_multiple_of(known) {
            return Err(Error::shape(
                op,
                format!("cannot infer -1 in {requested:?} for {numel} elements"),
            ));
        }
        out[i] = numel / known;
    } else if known != numel {
        return Err(Error::shape(
            op,
            format!("shape {requested:?} has {known} elements, the tensor has {numel}"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(
            broadcast_shapes("t", &[3, 1, 5], &[4, 1]).unwrap(),
            vec![3, 4, 5]
        );
        assert_eq!(broadcast_shapes("t", &[], &[2, 3]).unwrap(), vec![2, 3]);
        assert_eq!(broadcast_shapes("t", &[0, 1], &[1, 7]).unwrap(), vec![0, 7]);
        assert!(broadcast_shapes("t", &[3, 2], &[4, 2]).is_err());
    }

    #[test]
    fn layouts_index_views() {
        let l = Layout::contiguous(&[2, 3, 4]);
        assert_eq!(l.strides, vec![12, 4, 1]);
        assert!(l.is_contiguous());
        let p = l.permute("t", &[2, 0, 1]).unwrap();
        assert!(!p.is_contiguous());
        assert_eq!(p.index_of(1), 4); // p[0,0,1] = l[0,1,0]
        assert_eq!(p.index_of(3), 12); // p[0,1,0] = l[1,0,0]
        let n = l.narrow("t", 2, 1, 2).unwrap();
        assert_eq!(n.index_of(0), 1);
        assert_eq!(n.index_of(2), 5);
        let b = Layout::contiguous(&[3, 1])
            .broadcast_to("t", &[2, 3, 4])
            .unwrap();
        assert_eq!(b.strides, vec![0, 1, 0]);
        assert!(l.permute("t", &[0, 0, 1]).is_err());
        assert!(l.narrow("t", 1, 2, 2).is_err());
    }

    #[test]
    fn reshape_resolution() {
        assert_eq!(resolve_shape("t", &[-1, 4], 12).unwrap(), vec![3, 4]);
        assert!(resolve_shape("t", &[-1, -1], 12).is_err());
        assert!(resolve_shape("t", &[5], 12).is_err());
        assert!(resolve_shape("t", &[0, -1], 0).is_err());
    }
}
