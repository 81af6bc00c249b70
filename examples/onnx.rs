//! Loads an ONNX file into kiln's frozen inference (no Python, no code generation), runs a
//! batch, and prints the top classes of each sample and the latency per batch.
//!
//! ```text
//! cargo run --release --example onnx [-- FILE.onnx [BATCH]]
//! ```
//!
//! Without a file it loads `tests/fixtures/onnx/mobilenet.onnx`, a MobileNet-style network
//! exported by `torch.onnx.export` (random weights: the classes show the mechanics, not a
//! trained model). The batch is seeded random input of the shape the file declares, the
//! batch axis set to BATCH (default 8).

use std::path::PathBuf;
use std::time::Instant;

use kiln::infer::InferenceModel;
use kiln::{Device, Tensor};

fn main() -> kiln::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/mobilenet.onnx")
    });
    let batch: usize = match args.next() {
        Some(b) => b.parse().map_err(|_| kiln::Error::Io {
            op: "onnx example",
            path: b.clone(),
            message: "BATCH must be a positive integer".into(),
        })?,
        None => 8,
    };
    let dev = Device::default_device()?;
    println!("{}", dev.name());
    let t0 = Instant::now();
    let model = InferenceModel::load_onnx(&path, &dev)?;
    let shapes = model.input_shapes();
    println!(
        "{}: loaded in {:.1} ms, {} nodes after folding and fusion, {:.1} KiB of weights, \
         input {:?}",
        path.display(),
        t0.elapsed().as_secs_f64() * 1e3,
        model.node_count(),
        model.weight_bytes() as f64 / 1024.0,
        shapes[0]
    );
    let shape = shapes[0]
        .iter()
        .map(|d| d.at(batch))
        .collect::<kiln::Result<Vec<usize>>>()?;
    let x = Tensor::randn(&shape, 7, &dev)?;
    // The first call compiles the pipelines and plans the activation memory.
    let logits = model.predict(&x)?;
    let classes = *logits.dims().last().unwrap_or(&1);
    let probs = logits.reshape(&[-1, classes as isize])?.softmax(-1)?;
    let (p, idx) = probs.topk(3.min(classes), -1, true)?;
    let (p, idx) = (p.to_vec()?, idx.to_vec()?);
    let k = 3.min(classes);
    for s in 0..p.len() / k {
        let top: Vec<String> = (0..k)
            .map(|j| format!("class {} ({:.1}%)", idx[s * k + j], 100.0 * p[s * k + j]))
            .collect();
        println!("sample {s}: {}", top.join(", "));
    }
    let runs = 20;
    let start = Instant::now();
    for _ in 0..runs {
        model.predict(&x)?.to_vec()?;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
    println!(
        "batch {batch}: {ms:.2} ms per batch ({:.3} ms per sample), output read back each time",
        ms / batch as f64
    );
    Ok(())
}
