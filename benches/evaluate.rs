//! Target: evaluating the fp32 reference model on the 10k test images at
//! batch 64 takes at most 1.1x the time of ONNX Runtime's own Python API on
//! the same model, batches and threads.
//!
//! Runs both side by side: the Rust accuracy pass qsweep's evaluate stage
//! uses, and bench/ort_python_eval.py in the ./.venv that scripts/setup
//! makes. Both warm up with one pass, then time REPEATS passes; the medians
//! are compared.
//!
//!     cargo bench --bench evaluate            # QSWEEP_BENCH_THREADS=2 QSWEEP_BENCH_REPEATS=15
//!     cargo bench --bench evaluate -- --smoke # 640 images, one pass each side

mod common;

use common::{env_usize, smoke};

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use qsweep::data::{self, tensor_file, Split};
use qsweep::engine::{self, InferenceSession};
use qsweep::spec::{Dataset, Preprocess};

const BATCH: usize = 64;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let threads = env_usize("QSWEEP_BENCH_THREADS", 2, 2);
    let repeats = env_usize("QSWEEP_BENCH_REPEATS", 15, 1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("experiments/models/fashion-resnet8.onnx");

    let raw = data::load_split(Dataset::FashionMnist, Path::new(Dataset::FashionMnist.default_dir()), Split::Test)
        .expect("the Fashion-MNIST test split (run scripts/setup)");
    let preprocess = Preprocess { scale: 255.0, mean: vec![0.2860], std: vec![0.3530], ..Default::default() };
    let first: Vec<usize> = (0..640).collect();
    let tensors = raw.preprocess(&preprocess, smoke().then_some(first.as_slice()));
    let images = tensors.labels.len();
    let scratch = tempfile::tempdir().unwrap();
    let (images_path, labels_path) = (scratch.path().join("images.npy"), scratch.path().join("labels.npy"));
    tensor_file::write_npy(&images_path, &tensors.images.view().into_dyn()).unwrap();
    tensor_file::write_npy(&labels_path, &tensors.labels.view().into_dyn()).unwrap();
    let labels = tensors.labels.to_vec();

    let never = AtomicBool::new(false);
    let mut session = InferenceSession::open(&model, threads, None).expect("ONNX Runtime (run scripts/setup)");
    let rust_accuracy = engine::accuracy(&mut session, tensors.images.view(), &labels, BATCH, &never).unwrap().top1;
    let mut rust_seconds: Vec<f64> = (0..repeats)
        .map(|_| {
            let started = Instant::now();
            engine::accuracy(&mut session, tensors.images.view(), &labels, BATCH, &never).unwrap();
            started.elapsed().as_secs_f64()
        })
        .collect();

    let python = root.join(".venv/bin/python");
    let output = Command::new(&python)
        .arg(root.join("bench/ort_python_eval.py"))
        .args([&model, &images_path, &labels_path])
        .args([threads.to_string(), BATCH.to_string(), repeats.to_string()])
        .output()
        .expect("the .venv Python with onnxruntime (run scripts/setup)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let peer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut python_seconds: Vec<f64> =
        peer["pass_seconds"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let python_accuracy = peer["accuracy"].as_f64().unwrap();

    let (rust, python) = (median(&mut rust_seconds), median(&mut python_seconds));
    println!(
        "evaluate fp32 reference model, {images} images, batch {BATCH}, {threads} intra-op threads, median of {repeats}"
    );
    println!("  qsweep (ort crate)      {:>8.1} ms  top-1 {:.2}%", rust * 1e3, rust_accuracy * 100.0);
    println!("  onnxruntime Python API  {:>8.1} ms  top-1 {:.2}%", python * 1e3, python_accuracy * 100.0);
    println!("  ratio qsweep / Python   {:>8.3}  (target <= 1.10)", rust / python);
    println!("  ONNX Runtime {}", engine::runtime().unwrap().version);
    assert_eq!(rust_accuracy, python_accuracy, "both sides must compute the same predictions");
}
