//! The IDX format of MNIST: a big-endian header (magic with element type and rank, then each
//! dimension) followed by the raw elements.

use std::path::Path;

use super::{Dataset, InMemoryDataset};
use crate::error::{Error, Result};

/// Reads an IDX file of unsigned bytes (type 0x08): returns its dimensions and data.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    const OP: &str = "read_idx";
    let bytes =
        std::fs::read(path).map_err(|e| Error::invalid(OP, format!("{}: {e}", path.display())))?;
    parse_idx(&bytes).map_err(|msg| Error::invalid(OP, format!("{}: {msg}", path.display())))
}

fn parse_idx(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<u8>), String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "element type 0x{:02x} is not unsigned bytes (0x08)",
            bytes[2]
        ));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err("truncated header".into());
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            u32::from_be_bytes([
                bytes[4 + 4 * i],
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
            ]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("dimensions overflow")?;
    if bytes.len() != header + count {
        return Err(format!(
            "expected {} data bytes for dimensions {dims:?}, found {}",
            count,
            bytes.len() - header
        ));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// MNIST from a directory holding the four raw IDX files (`train-images-idx3-ubyte`, ...):
/// (train, test) with pixels scaled to 0..1 and normalised with MNIST's mean 0.1307 and
/// standard deviation 0.3081, shape 1xHxW as the files give it (1x28x28 for MNIST; both
/// splits must agree). Labels must be below 10. `scripts/fetch_mnist` downloads the files.
pub fn mnist(dir: &Path) -> Result<(InMemoryDataset, InMemoryDataset)> {
    let load = |images: &str, labels: &str| -> Result<InMemoryDataset> {
        let (idims, pixels) = read_idx(&dir.join(images))?;
        let (ldims, labs) = read_idx(&dir.join(labels))?;
        if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
            return Err(Error::shape(
                "mnist",
                format!("{images} {idims:?} and {labels} {ldims:?} do not match"),
            ));
        }
        let features = pixels
            .iter()
            .map(|&p| (p as f32 / 255.0 - 0.1307) / 0.3081)
            .collect();
        let labels = labs.iter().map(|&l| l as usize).collect();
        InMemoryDataset::new(features, labels, &[1, idims[1], idims[2]], 10)
    };
    let train = load("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = load("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    if train.feature_shape() != test.feature_shape() {
        return Err(Error::shape(
            "mnist",
            format!(
                "training images are {:?}, test images {:?}",
                train.feature_shape(),
                test.feature_shape()
            ),
        ));
    }
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::parse_idx;

    #[test]
    fn parses_and_rejects() {
        let mut f = vec![0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        f.extend([1, 2, 3, 4, 5, 6]);
        assert_eq!(parse_idx(&f).unwrap(), (vec![2, 3], vec![1, 2, 3, 4, 5, 6]));
        assert!(parse_idx(&f[..15])
            .unwrap_err()
            .contains("expected 6 data bytes"));
        let mut g = f.clone();
        g[2] = 0x0d;
        assert!(parse_idx(&g).is_err());
        assert!(parse_idx(&[1, 2]).is_err());
    }
}
