//! evaluate: top-1 accuracy on the whole test split, then latency and
//! throughput at each configured batch size, recorded with the thread
//! count, engine, ONNX Runtime version and machine that produced them.

use std::path::Path;

use ndarray::{s, Array4, Ix4};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{build, params, prepare_data, StageContext, StageError};
use crate::data::tensor_file;
use crate::engine::{self, InferenceSession, Provider};
use crate::plan::Task;
use crate::spec::Engine;

pub const VERSION: u32 = 2;

#[derive(Deserialize)]
struct Params {
    batch_sizes: Vec<usize>,
    warmup: usize,
    iterations: usize,
    threads: u32,
    engine: Engine,
}

pub fn run(task: &Task, context: &StageContext<'_>, _out: &Path) -> Result<Value, StageError> {
    let p: Params = params(task)?;
    let build_dir = context.input_dir(task, "model")?;
    let model = build_dir.join(build::ENGINE_MODEL);
    let int8 = task
        .input("model")
        .and_then(|key| context.results.manifest(key))
        .is_some_and(|m| m.metrics["precision"] == "int8");
    let provider = Provider::for_engine(p.engine, int8, &build_dir);
    let data = context.input_dir(task, "data")?;
    let images: Array4<f32> = tensor_file::read_npy::<f32>(&data.join(prepare_data::IMAGES))?
        .into_dimensionality::<Ix4>()
        .map_err(|e| StageError::Fatal(format!("test images are not NCHW: {e}")))?;
    let labels = tensor_file::read_npy::<i64>(&data.join(prepare_data::LABELS))?.into_raw_vec_and_offset().0;

    let threads = engine::resolve_threads(p.threads);
    let mut session = InferenceSession::open_with(&model, threads, None, &provider)?;
    let accuracy_batch = p.batch_sizes.iter().copied().max().unwrap_or(1);
    let started = std::time::Instant::now();
    let accuracy = engine::accuracy(&mut session, images.view(), &labels, accuracy_batch, context.cancel)?;
    let accuracy_pass_s = started.elapsed().as_secs_f64();

    let mut latency = Vec::new();
    for &batch in &p.batch_sizes {
        let rows = batch.min(images.shape()[0]);
        let input = images.slice(s![..rows, .., .., ..]);
        latency.push(engine::measure_latency(&mut session, input, p.warmup, p.iterations, context.cancel)?);
    }

    Ok(json!({
        "accuracy": accuracy.top1,
        "top5": accuracy.top5,
        "test_images": labels.len(),
        "accuracy_batch": accuracy_batch,
        "accuracy_pass_s": accuracy_pass_s,
        "latency": latency,
        "threads": threads,
        "engine": p.engine,
        "onnxruntime": engine::runtime()?.version,
        "machine": machine(),
    }))
}

/// A short description of the machine, since latency means nothing without it.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(1, usize::from),
        "host": host,
        "os": std::env::consts::OS,
    })
}
