//! Targets of the calibrate stage, on the reference model:
//! - one pass: calibrating takes at most 1.3x a plain fp32 forward pass
//!   over the same samples, and yields all four methods' statistics;
//! - memory: its peak RSS grows by less than 10% from 500 to 5,000 samples.
//!
//! Both sides include opening the session, use the same threads and batch
//! size, and read the samples from the same .npy file a batch at a time.
//! Peak RSS is the process high-water mark, reset (via
//! /proc/self/clear_refs) just before each measured phase.
//!
//!     cargo bench --bench calibrate            (-- --smoke: 64 and 128 samples, once)

mod common;

use common::{peak_rss_mb, reset_peak_rss, smoke};

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use ndarray::Ix4;
use qsweep::data::tensor_file::{self, NpyBatches};
use qsweep::data::{self, Split};
use qsweep::engine::{self, InferenceSession};
use qsweep::onnx::Model;
use qsweep::spec::{Dataset, Preprocess};
use qsweep::stages::calibrate;

const BATCH: usize = 64;

/// Best time of `repeats` runs of `f`, and the peak RSS (MB) over them.
fn measure(repeats: usize, mut f: impl FnMut()) -> (f64, f64) {
    reset_peak_rss();
    let mut best = f64::MAX;
    for _ in 0..repeats {
        let started = Instant::now();
        f();
        best = best.min(started.elapsed().as_secs_f64());
    }
    (best, peak_rss_mb())
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join("experiments/models/fashion-resnet8.onnx");
    let model = Model::load(&model_path).unwrap();
    let threads = engine::resolve_threads(0);
    let scratch = tempfile::tempdir().unwrap();

    let (sizes, repeats) = if smoke() { ([64usize, 128], 1) } else { ([500, 5000], 5) };
    {
        let raw = data::load_split(Dataset::FashionMnist, Path::new(Dataset::FashionMnist.default_dir()), Split::Train)
            .expect("the Fashion-MNIST training split (run scripts/setup)");
        let preprocess = Preprocess { scale: 255.0, mean: vec![0.2860], std: vec![0.3530], ..Default::default() };
        for samples in sizes {
            let indices = data::calibration_indices(raw.count, samples, 0);
            let tensors = raw.preprocess(&preprocess, Some(&indices));
            tensor_file::write_npy(&scratch.path().join(format!("{samples}.npy")), &tensors.images.view().into_dyn())
                .unwrap();
        }
    }

    println!("calibrate vs plain forward pass, reference model, batch {BATCH}, {threads} threads, best of {repeats}");
    let never = AtomicBool::new(false);
    let mut peaks = Vec::new();
    for samples in sizes {
        let npy = scratch.path().join(format!("{samples}.npy"));
        let (forward_s, forward_mb) = measure(repeats, || {
            let mut session = InferenceSession::open(&model_path, threads, None).unwrap();
            for batch in NpyBatches::open(&npy, BATCH).unwrap() {
                session.run(batch.unwrap().into_dimensionality::<Ix4>().unwrap().view()).unwrap();
            }
        });
        let mut tensors = 0;
        let (calibrate_s, calibrate_mb) = measure(repeats, || {
            let batches =
                NpyBatches::open(&npy, BATCH).unwrap().map(|read| Ok::<_, qsweep::stages::StageError>(read.unwrap()));
            let stats = calibrate::collect(&model.proto, scratch.path(), threads, batches, &never, |_| {}).unwrap();
            tensors = stats.tensors.len();
        });
        println!(
            "  {samples:>5} samples: forward {:>7.1} ms ({forward_mb:.0} MB peak), calibrate {:>7.1} ms ({calibrate_mb:.0} MB peak, {tensors} tensors, 4 methods), ratio {:.2} (target <= 1.3)",
            forward_s * 1e3,
            calibrate_s * 1e3,
            calibrate_s / forward_s
        );
        peaks.push(calibrate_mb);
    }
    println!(
        "  calibrate peak RSS {} -> {} samples: {:.0} MB -> {:.0} MB, growth {:+.1}% (target < 10% for 10x)",
        sizes[0],
        sizes[1],
        peaks[0],
        peaks[1],
        (peaks[1] / peaks[0] - 1.0) * 100.0
    );
}
