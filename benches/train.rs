//! Training throughput: qsweep's interpreter training the reference
//! resnet-8 (fp32, BatchNorm in batch mode) on Fashion-MNIST, side by side
//! with PyTorch training the same architecture at the same batch size and
//! thread count (bench/torch_train.py), and the ratio.
//!
//! First, the convolution layer (batch 128, 48 channels, 14x14,
//! 3x3): candle's conv2d and its backward, qsweep's im2col/GEMM op, and
//! PyTorch's, forward and forward+backward.
//!
//!   cargo bench --bench train          (QSWEEP_BENCH_STEPS, QSWEEP_BENCH_BATCH,
//!                                       QSWEEP_TORCH_PYTHON for the peer)
//!   cargo bench --bench train -- --smoke   (2 steps of batch 16, the layer once)

mod common;

use common::{env_usize, peer_missing, smoke};

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use qsweep::data::{self, Split};
use qsweep::spec::{Dataset, Preprocess};
use qsweep::train::fit::{fit, Examples};
use qsweep::train::network::{BatchNorm, Network};

/// Mean milliseconds of `f` over `runs` runs, after one warm-up.
fn time_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let started = Instant::now();
    for _ in 0..runs {
        f();
    }
    started.elapsed().as_secs_f64() * 1000.0 / runs as f64
}

/// Whether `python` imports torch: the peer's half runs only then.
fn has_torch(python: &str) -> bool {
    Command::new(python).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success())
}

/// The peer's output, run by `python` with `args`.
fn torch_peer(python: &str, root: &Path, args: &[String]) -> String {
    let output = Command::new(python).arg(root.join("bench/torch_train.py")).args(args).output().unwrap();
    assert!(output.status.success(), "torch_train.py {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn convolution_layer(peer: Option<&str>, root: &Path) {
    use candle_core::{Device, Tensor, Var};
    use qsweep::train::ops::{Conv2d, Geometry};
    let runs = if smoke() { 1 } else { 5 };
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, 48, 14, 14), &Device::Cpu).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (48, 48, 3, 3), &Device::Cpu).unwrap()).unwrap();
    let geometry = Geometry { kernel: [3, 3], stride: [1, 1], pads: [1; 4], dilation: [1, 1], ceil: false };
    let candle_forward = || x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap();
    let ours_forward = || x.as_tensor().apply_op2(w.as_tensor(), Conv2d(geometry)).unwrap();
    let candle_f = time_ms(runs, || drop(candle_forward()));
    let candle_fb = time_ms(runs, || drop(candle_forward().sum_all().unwrap().backward().unwrap()));
    let ours_f = time_ms(runs, || drop(ours_forward()));
    let ours_fb = time_ms(runs, || drop(ours_forward().sum_all().unwrap().backward().unwrap()));
    println!("conv 128x48x14x14, 3x3: candle forward {candle_f:.1} ms, forward+backward {candle_fb:.1} ms");
    println!("conv 128x48x14x14, 3x3: qsweep forward {ours_f:.1} ms, forward+backward {ours_fb:.1} ms");
    if let Some(python) = peer {
        println!("conv 128x48x14x14, 3x3: PyTorch {}", torch_peer(python, root, &["conv".into(), runs.to_string()]));
    }
}

fn main() {
    // As training does (`fit` calls it too).
    qsweep::train::fit::keep_freed_memory();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("QSWEEP_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let peer = has_torch(&python).then_some(python.as_str());
    if peer.is_none() {
        peer_missing(
            &format!("PyTorch ({python} cannot import torch)"),
            "apt-get install python3-torch, or set QSWEEP_TORCH_PYTHON to a Python that has it",
        );
    }
    convolution_layer(peer, root);
    let steps = env_usize("QSWEEP_BENCH_STEPS", 20, 2);
    let batch = env_usize("QSWEEP_BENCH_BATCH", 128, 16);
    let threads = rayon::current_num_threads();
    let model = qsweep::onnx::Model::load(&root.join("experiments/models/fashion-resnet8.onnx")).unwrap();
    let raw =
        data::load_split(Dataset::FashionMnist, Path::new(Dataset::FashionMnist.default_dir()), Split::Train).unwrap();
    let preprocess = Preprocess { scale: 255.0, mean: vec![0.2860], std: vec![0.3530], ..Default::default() };
    let indices: Vec<usize> = (0..batch * steps).collect();
    let examples: Examples = raw.preprocess(&preprocess, Some(&indices)).into();
    let mut network = Network::from_model(&model.proto, BatchNorm::Batch, None).unwrap();
    let recipe = qsweep::train::fit::Recipe {
        epochs: 1,
        learning_rate: 0.01,
        momentum: 0.9,
        weight_decay: 5e-4,
        batch_size: batch,
        seed: 0,
        augment: Vec::new(),
    };
    // Three warm-up steps, as the peer takes, then the timed epoch.
    let checkpoint = tempfile::tempdir().unwrap();
    let warm_up_indices: Vec<usize> = (0..3 * batch).collect();
    let warm_up: Examples = raw.preprocess(&preprocess, Some(&warm_up_indices)).into();
    fit(&mut network, &warm_up, &recipe, &checkpoint.path().join("warm-up"), None, &AtomicBool::new(false), |_| {})
        .unwrap();
    let started = Instant::now();
    qsweep::train::fit::fit(&mut network, &examples, &recipe, checkpoint.path(), None, &AtomicBool::new(false), |_| {})
        .unwrap();
    let ours = (batch * steps) as f64 / started.elapsed().as_secs_f64();
    println!("qsweep:  {ours:.0} img/s (resnet-8, batch {batch}, {threads} threads, {steps} steps)");

    if let Some(python) = peer {
        let text = torch_peer(python, root, &[batch.to_string(), steps.to_string(), threads.to_string()]);
        let theirs: f64 = text.parse().expect("torch_train.py prints img/s");
        println!("PyTorch: {theirs:.0} img/s (same architecture, batch and threads)");
        println!("ratio qsweep/PyTorch: {:.2} (target >= 0.5)", ours / theirs);
    }
}
