//! Fuzz of IDX files (MNIST's format): 500 mutated files are read. Each is an `Err`, or `Ok`
//! with the dimensions and bytes an independent parser finds; then MNIST directories with
//! mismatched or corrupt files. Nothing panics.

mod common;

use std::panic::catch_unwind;
use std::path::Path;

use common::*;

fn idx(dims: &[u32], fill: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    let n: usize = dims.iter().map(|&d| d as usize).product();
    v.extend((0..n).map(fill));
    v
}

/// The format, read independently: magic 0 0, type 8, rank, big-endian u32 sizes, then
/// exactly as many bytes as the sizes multiply to.
fn reference(b: &[u8]) -> Option<(Vec<usize>, Vec<u8>)> {
    if b.len() < 4 || b[..3] != [0, 0, 8] {
        return None;
    }
    let rank = b[3] as usize;
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            b.get(4 + 4 * i..8 + 4 * i)
                .map(|w| u32::from_be_bytes(w.try_into().unwrap()) as usize)
        })
        .collect::<Option<_>>()?;
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let data = &b[4 + 4 * rank..];
    (data.len() == n).then(|| (dims, data.to_vec()))
}

fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = base.to_vec();
    match rng.below(6) {
        0 => b.truncate(rng.below(b.len())),
        1 => {
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len().min(24));
                b[at] ^= 1 << rng.below(8);
            }
        }
        2 => b[3] = [0, 1, 2, 4, 8, 255][rng.below(6)],
        3 => {
            let k = rng.below(b[3].max(1) as usize);
            let v = [0u32, 1, 2, u32::MAX, 1 << 16, 28][rng.below(6)];
            if 8 + 4 * k <= b.len() {
                b[4 + 4 * k..8 + 4 * k].copy_from_slice(&v.to_be_bytes());
            }
        }
        4 => b.extend(std::iter::repeat_n(7, 1 + rng.below(5))),
        _ => b[2] = [0x09, 0x0b, 0x0c, 0x0d, 0x0e][rng.below(5)],
    }
    b
}

fn read(path: &Path, bytes: &[u8]) -> std::thread::Result<kiln::Result<(Vec<usize>, Vec<u8>)>> {
    std::fs::write(path, bytes).unwrap();
    catch_unwind(|| kiln::data::read_idx(path))
}

#[test]
fn hostile_idx_files_are_err_or_read_exactly() {
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f");
    let bases = [
        idx(&[3, 28, 28], |i| (i % 251) as u8),
        idx(&[5], |i| i as u8),
        idx(&[2, 3, 4, 5], |i| (i * 7) as u8),
    ];
    let mut rng = Rng::new(31);
    let (mut ok, mut failures) = (0, Vec::new());
    for case in 0..500 {
        let bytes = mutate(&bases[case % bases.len()], &mut rng);
        match read(&path, &bytes) {
            Err(_) => failures.push(format!("panic on case {case}")),
            Ok(got) => {
                let want = reference(&bytes);
                match (got, want) {
                    (Ok(g), Some(w)) if g == w => ok += 1,
                    (Err(_), None) => {}
                    (g, w) => failures.push(format!(
                        "case {case}: kiln {:?}, reference {:?}",
                        g.map(|g| g.0),
                        w.map(|w| w.0)
                    )),
                }
            }
        }
    }
    // MNIST directories: counts that disagree, labels out of range, wrong image sizes.
    let write = |name: &str, b: &[u8]| std::fs::write(dir.join(name), b).unwrap();
    let images = |n: u32, side: u32| idx(&[n, side, side], |i| i as u8);
    let labels = |n: u32, first: u8| idx(&[n], move |i| first + (i % 10) as u8);
    for (k, (tr_i, tr_l, te_i, te_l)) in [
        // Valid: 28x28 MNIST.
        (images(3, 28), labels(3, 0), images(2, 28), labels(2, 0)),
        // Valid: other image sizes (the dataset takes the file's) and an empty split.
        (images(3, 27), labels(3, 0), images(2, 27), labels(2, 0)),
        (images(0, 28), labels(0, 0), images(2, 28), labels(2, 0)),
        // Counts that disagree, labels of 10 and above, images where labels belong, and
        // splits of different image sizes.
        (images(3, 28), labels(4, 0), images(2, 28), labels(2, 0)),
        (images(3, 28), labels(3, 10), images(2, 28), labels(2, 0)),
        (labels(3, 0), images(3, 28), images(2, 28), labels(2, 0)),
        (images(3, 28), labels(3, 0), images(2, 27), labels(2, 0)),
    ]
    .into_iter()
    .enumerate()
    {
        write("train-images-idx3-ubyte", &tr_i);
        write("train-labels-idx1-ubyte", &tr_l);
        write("t10k-images-idx3-ubyte", &te_i);
        write("t10k-labels-idx1-ubyte", &te_l);
        match catch_unwind(|| kiln::data::mnist(&dir)) {
            Err(_) => failures.push(format!("mnist panicked on directory {k}")),
            Ok(r) => {
                if (k < 3) != r.is_ok() {
                    failures.push(format!("mnist directory {k}: {:?}", r.err()));
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("500 IDX files: {ok} read, {} failures", failures.len());
    assert!(ok > 20, "{ok} valid files");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
