//! Training throughput: qsweep's interpreter training the reference
//! resnet-8 (fp32, BatchNorm in batch mode) on Fashion-MNIST, side by side
//! with PyTorch training the same architecture at the same batch size and
//! thread count (bench/torch_train.py), and the ratio.
//!
//!   cargo bench --bench train          (QSWEEP_BENCH_STEPS, QSWEEP_BENCH_BATCH)

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use qsweep::data::{self, Split};
use qsweep::spec::{Dataset, Preprocess};
use qsweep::train::fit::Examples;
use qsweep::train::network::{BatchNorm, Network};

fn main() {
    let steps = common::env_usize("QSWEEP_BENCH_STEPS", 20);
    let batch = common::env_usize("QSWEEP_BENCH_BATCH", 128);
    let threads = rayon::current_num_threads();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = qsweep::onnx::Model::load(&root.join("experiments/models/fashion-resnet8.onnx")).unwrap();
    let raw =
        data::load_split(Dataset::FashionMnist, Path::new(Dataset::FashionMnist.default_dir()), Split::Train).unwrap();
    let preprocess = Preprocess { scale: 255.0, mean: vec![0.2860], std: vec![0.3530] };
    let indices: Vec<usize> = (0..batch * steps).collect();
    let tensors = raw.preprocess(&preprocess, Some(&indices));
    let examples = Examples {
        images: tensors.images.iter().copied().collect(),
        image_shape: [1, 28, 28],
        labels: tensors.labels.iter().map(|&l| l as u32).collect(),
    };
    let mut network = Network::from_model(&model.proto, BatchNorm::Batch, None).unwrap();
    let recipe = qsweep::train::fit::Recipe {
        epochs: 1,
        learning_rate: 0.01,
        momentum: 0.9,
        weight_decay: 5e-4,
        batch_size: batch,
        seed: 0,
        augment: false,
    };
    // A warm-up epoch of a few steps, then the timed epoch.
    let checkpoint = tempfile::tempdir().unwrap();
    let started = Instant::now();
    qsweep::train::fit::fit(&mut network, &examples, &recipe, checkpoint.path(), &AtomicBool::new(false), |_| {})
        .unwrap();
    let ours = (batch * steps) as f64 / started.elapsed().as_secs_f64();
    println!("qsweep:  {ours:.0} img/s (resnet-8, batch {batch}, {threads} threads, {steps} steps)");

    let python = std::env::var("QSWEEP_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .arg(root.join("bench/torch_train.py"))
        .args([batch.to_string(), steps.to_string(), threads.to_string()])
        .output();
    match output {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            let theirs: f64 = text.trim().parse().expect("torch_train.py prints img/s");
            println!("PyTorch: {theirs:.0} img/s (same architecture, batch and threads)");
            println!("ratio qsweep/PyTorch: {:.2} (target >= 0.5)", ours / theirs);
        }
        other => println!("PyTorch peer did not run ({python}; set QSWEEP_TORCH_PYTHON): {other:?}"),
    }
}
