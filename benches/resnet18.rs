//! Targets on torchvision's ResNet-18 at 224x224 (random weights: speed and
//! memory do not depend on them):
//! - the int8 build qsweep chooses for the CPU engine (onnxruntime-cpu
//!   format, residual fusion) against fp32 at batch 1 and 64, and against
//!   ONNX Runtime's best CPU recipe (bench/ort_resnet18.py), about 1.7x
//!   faster than fp32 at batch 1 when measured for the issue;
//! - calibrate's peak RSS with 500 samples stays under 1 GB;
//! - calibrate against a plain forward pass over the same samples.
//!
//! ```sh
//! python3 bench/export_resnet18.py /tmp/resnet18.onnx
//! QSWEEP_RESNET18=/tmp/resnet18.onnx cargo bench --bench resnet18
//! ```
//!
//! QSWEEP_BENCH_SAMPLES (default 500) and QSWEEP_BENCH_ITERATIONS (20).
//! `-- --smoke` runs every step, the peer's included, on 64 samples and 2
//! iterations, on the reference model when QSWEEP_RESNET18 is not set
//! (exporting ResNet-18 needs PyTorch, which scripts/setup does not
//! install).

mod common;

use common::{env_usize, peak_rss_mb, reset_peak_rss, smoke};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use ndarray::{Array4, Ix4};
use prost::Message;
use qsweep::data::tensor_file::{self, NpyBatches};
use qsweep::engine::{self, InferenceSession};
use qsweep::onnx::Model;
use qsweep::quant::{amax, qdq};
use qsweep::spec::{CalibrationMethod, Int8Format};
use qsweep::stages::calibrate;
use rand::{Rng, SeedableRng};

const CALIBRATION_BATCH: usize = 8;

fn p50(model: &Path, threads: usize, input: &Array4<f32>, batch: usize, iterations: usize) -> f64 {
    let mut session = InferenceSession::open(model, threads, None).unwrap();
    let rows = input.slice(ndarray::s![..batch, .., .., ..]);
    engine::measure_latency(&mut session, rows, 2, iterations, &AtomicBool::new(false)).unwrap().p50_ms
}

/// Mean cosine similarity of fp32 and int8 logits over 16 samples: random
/// weights leave no accuracy to measure, but int8 must still track fp32.
fn logit_similarity(fp32: &Path, int8: &Path, images: &Array4<f32>) -> f64 {
    let batch = images.slice(ndarray::s![..16, .., .., ..]);
    let a = InferenceSession::open(fp32, 2, None).unwrap().run(batch).unwrap();
    let b = InferenceSession::open(int8, 2, None).unwrap().run(batch).unwrap();
    let cosine = |x: ndarray::ArrayView1<f32>, y: ndarray::ArrayView1<f32>| {
        (x.dot(&y) / (x.dot(&x).sqrt() * y.dot(&y).sqrt())) as f64
    };
    a.outer_iter().zip(b.outer_iter()).map(|(x, y)| cosine(x, y)).sum::<f64>() / 16.0
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (model_path, shape) = match std::env::var_os("QSWEEP_RESNET18").map(PathBuf::from) {
        Some(path) => (path, (3, 224, 224)),
        None if smoke() => {
            println!("  (smoke: QSWEEP_RESNET18 is not set, so the reference model stands in for ResNet-18)");
            (root.join("experiments/models/fashion-resnet8.onnx"), (1, 28, 28))
        }
        None => panic!("set QSWEEP_RESNET18 to a ResNet-18 ONNX (python3 bench/export_resnet18.py OUT.onnx)"),
    };
    let samples = env_usize("QSWEEP_BENCH_SAMPLES", 500, 64);
    let iterations = env_usize("QSWEEP_BENCH_ITERATIONS", 20, 2);
    let threads = engine::resolve_threads(0);
    let scratch = tempfile::tempdir().unwrap();
    let model = Model::load(&model_path).unwrap();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let images = Array4::from_shape_simple_fn((samples, shape.0, shape.1, shape.2), || rng.random_range(-2.0f32..2.0));
    let npy = scratch.path().join("calibration.npy");
    tensor_file::write_npy(&npy, &images.view().into_dyn()).unwrap();

    let forward_started = Instant::now();
    {
        let mut session = InferenceSession::open(&model_path, threads, None).unwrap();
        for batch in NpyBatches::open(&npy, CALIBRATION_BATCH).unwrap() {
            session.run(batch.unwrap().into_dimensionality::<Ix4>().unwrap().view()).unwrap();
        }
    }
    let forward_s = forward_started.elapsed().as_secs_f64();

    reset_peak_rss();
    let calibrate_started = Instant::now();
    let batches = NpyBatches::open(&npy, CALIBRATION_BATCH)
        .unwrap()
        .map(|read| Ok::<_, qsweep::stages::StageError>(read.unwrap()));
    let stats =
        calibrate::collect(&model.proto, scratch.path(), threads, batches, &AtomicBool::new(false), |_| {}).unwrap();
    let calibrate_s = calibrate_started.elapsed().as_secs_f64();
    let calibrate_peak = peak_rss_mb();

    let ranges: HashMap<String, qdq::Range> = stats
        .tensors
        .iter()
        .map(|t| {
            let amax = amax::amax(CalibrationMethod::Max, &t.histogram, 99.99);
            (t.name.clone(), qdq::Range { amax, nonnegative: t.histogram.min >= 0.0 })
        })
        .collect();
    let (quantized, summary) = qdq::quantize(&model.proto, &ranges, Int8Format::OnnxruntimeCpu, true).unwrap();
    let int8_path = scratch.path().join("int8.onnx");
    std::fs::write(&int8_path, quantized.encode_to_vec()).unwrap();

    let peer = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("bench/ort_resnet18.py"))
        .args([&model_path, &npy, &scratch.path().join("ort.onnx")])
        .args([threads.to_string(), iterations.to_string()])
        .output()
        .expect("the .venv Python (run scripts/setup)");
    assert!(peer.status.success(), "{}", String::from_utf8_lossy(&peer.stderr));
    let peer: serde_json::Value = serde_json::from_slice(&peer.stdout).unwrap();

    let name = model_path.file_name().unwrap_or_default().to_string_lossy();
    println!(
        "{name} {}x{}, {threads} threads, {samples} calibration samples, p50 of {iterations} runs",
        shape.1, shape.2
    );
    println!(
        "  calibrate: {calibrate_s:.1} s against a plain forward pass of {forward_s:.1} s ({:.2}x, target 1.3x), peak RSS {calibrate_peak:.0} MB (target < 1024 MB)",
        calibrate_s / forward_s
    );
    println!(
        "  int8 build: {} Q/DQ, {} BatchNorms folded, float residual Adds: {}; logits' cosine similarity to fp32 {:.4}",
        summary.qdq_pairs,
        summary.folded_batch_norms,
        summary.float_adds.len(),
        logit_similarity(&model_path, &int8_path, &images)
    );
    for batch in [1usize, 64] {
        let fp32 = p50(&model_path, threads, &images, batch, iterations);
        let int8 = p50(&int8_path, threads, &images, batch, iterations);
        let ort = peer[format!("batch{batch}_p50_ms")].as_f64().unwrap();
        println!(
            "  batch {batch:>2}: fp32 {fp32:>8.2} ms, qsweep int8 {int8:>8.2} ms ({:.2}x fp32), ORT quantize_static U8S8 {ort:>8.2} ms ({:.2}x fp32)",
            fp32 / int8,
            fp32 / ort
        );
    }
}
