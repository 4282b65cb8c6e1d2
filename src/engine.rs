//! ONNX Runtime: finding the library, opening sessions, and measuring them.
//!
//! qsweep loads libonnxruntime at run time (`ort`'s `load-dynamic`), so one
//! binary works with whichever ONNX Runtime build a machine has: the CPU
//! wheel on a laptop, the GPU wheel on a cluster node. The library comes from
//! the `onnxruntime` package on PyPI; `find_library` looks where pip puts it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use ndarray::{s, Array2, ArrayView4, Axis};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::spec::Engine;

/// The ONNX Runtime release qsweep is built and tested against.
pub const EXPECTED_VERSION: &str = "1.31";

#[derive(Debug, Clone, Error)]
pub enum EngineError {
    #[error(
        "ONNX Runtime library not found (looked in {searched}).\n  fix: run scripts/setup, or `pip install onnxruntime=={EXPECTED_VERSION}.*` \
         into a virtualenv at ./.venv, or set ORT_DYLIB_PATH to the path of libonnxruntime.so"
    )]
    LibraryNotFound { searched: String },
    #[error("cannot load ONNX Runtime from {path}: {reason}\n  fix: install onnxruntime {EXPECTED_VERSION}.x from PyPI, or point ORT_DYLIB_PATH at a matching libonnxruntime.so")]
    Load { path: PathBuf, reason: String },
    #[error("ONNX Runtime failed while {doing}: {message}")]
    Ort { doing: String, message: String },
    #[error(
        "the ONNX Runtime library qsweep loaded has no {provider}.\n  fix: on a machine with an NVIDIA GPU, `pip install onnxruntime-gpu=={EXPECTED_VERSION}.*` \
         (with CUDA and TensorRT installed) and point ORT_DYLIB_PATH at its libonnxruntime.so, or use \"engine\": \"cpu\""
    )]
    ProviderMissing { provider: &'static str },
    #[error("label {label} is out of range: the model scores {classes} classes\n  fix: check the data source's classes against the model's output")]
    LabelOutOfRange { label: i64, classes: usize },
    #[error("interrupted")]
    Cancelled,
}

impl EngineError {
    fn ort(doing: impl Into<String>) -> impl FnOnce(ort::Error) -> EngineError {
        let doing = doing.into();
        move |e| EngineError::Ort { doing, message: e.to_string() }
    }
}

/// The loaded library and its one process-wide environment.
pub struct Runtime {
    environment: ort::environment::Environment,
    pub library: PathBuf,
    /// e.g. "1.31.1", read from the library's versioned file name.
    pub version: String,
}

/// Loads ONNX Runtime once per process.
pub fn runtime() -> Result<&'static Runtime, EngineError> {
    // The first failure is kept and returned as it was, so every caller
    // sees the same error with its own fix, not a wrapped copy.
    static RUNTIME: OnceLock<Result<Runtime, EngineError>> = OnceLock::new();
    RUNTIME.get_or_init(load_runtime).as_ref().map_err(Clone::clone)
}

/// Fails when this machine cannot run `engine`: ONNX Runtime does not
/// load, or lacks the engine's provider (the cache directory only matters
/// to sessions, not to the question).
pub fn check_engine(engine: Engine) -> Result<(), EngineError> {
    Provider::for_engine(engine, false, Path::new(".")).check_available()
}

fn load_runtime() -> Result<Runtime, EngineError> {
    let library = find_library()?;
    let load_error = |reason: String| EngineError::Load { path: library.clone(), reason };
    let environment = ort::init_from(&library)
        .map_err(|e| load_error(e.to_string()))?
        .with_name("qsweep")
        .build()
        .map_err(|e| load_error(e.to_string()))?;
    let version = library_version(&library).unwrap_or_else(|| "unknown".to_string());
    Ok(Runtime { environment, library, version })
}

/// "1.31.1" from `libonnxruntime.so.1.31.1` or a symlink to it; the
/// library's build string does not carry its release number.
fn library_version(library: &Path) -> Option<String> {
    let real = std::fs::canonicalize(library).unwrap_or_else(|_| library.to_path_buf());
    let name = real.file_name()?.to_string_lossy().to_string();
    let version = name.split_once(".so.")?.1;
    (!version.is_empty()).then(|| version.to_string())
}

/// Where libonnxruntime is: `ORT_DYLIB_PATH`, else the `onnxruntime` wheel in
/// ./.venv, `$VIRTUAL_ENV`, the virtualenv beside the qsweep checkout, or
/// whatever `python3` imports.
pub fn find_library() -> Result<PathBuf, EngineError> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(EngineError::LibraryNotFound {
                searched: format!("ORT_DYLIB_PATH={}, which does not exist", path.display()),
            })
        };
    }
    let mut roots: Vec<PathBuf> = vec![PathBuf::from(".venv")];
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(venv));
    }
    // target/<profile>/qsweep -> the checkout's .venv, so the binary works
    // from any directory after scripts/setup.
    if let Some(checkout) = std::env::current_exe().ok().and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf)) {
        roots.push(checkout.join(".venv"));
    }
    for root in &roots {
        if let Some(found) = library_in_venv(root) {
            return Ok(found);
        }
    }
    if let Some(package_dir) = python_package_dir() {
        if let Some(found) = library_in_package(&package_dir) {
            return Ok(found);
        }
    }
    let searched = roots.iter().map(|r| r.display().to_string()).chain(["python3's site-packages".to_string()]);
    Err(EngineError::LibraryNotFound { searched: searched.collect::<Vec<_>>().join(", ") })
}

fn library_in_venv(root: &Path) -> Option<PathBuf> {
    entries_starting_with(&root.join("lib"), "python3")
        .iter()
        .find_map(|python| library_in_package(&python.join("site-packages/onnxruntime")))
}

fn library_in_package(package_dir: &Path) -> Option<PathBuf> {
    // The fully versioned name sorts last and is the real file.
    entries_starting_with(&package_dir.join("capi"), "libonnxruntime.so").pop()
}

/// The entries of `dir` whose names start with `prefix`, sorted.
fn entries_starting_with(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect();
    found.sort();
    found
}

/// Asks python3 where its `onnxruntime` package is. The command is fixed;
/// nothing from a spec reaches it.
fn python_package_dir() -> Option<PathBuf> {
    let output = std::process::Command::new("python3")
        .args(["-c", "import os, onnxruntime; print(os.path.dirname(onnxruntime.__file__))"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    output.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// Where a session runs, with the options qsweep gives ONNX Runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda,
    /// TensorRT, with int8 kernels enabled for Q/DQ models and its built
    /// engine (and timing cache) kept in `cache_dir`, the build artifact.
    TensorRt {
        int8: bool,
        cache_dir: PathBuf,
    },
}

impl Provider {
    /// The provider of `engine` for a model that is (or is not) int8.
    pub fn for_engine(engine: Engine, int8: bool, cache_dir: &Path) -> Self {
        match engine {
            Engine::Cpu => Provider::Cpu,
            Engine::Cuda => Provider::Cuda,
            Engine::Tensorrt => Provider::TensorRt { int8, cache_dir: cache_dir.to_path_buf() },
        }
    }

    /// The provider options qsweep sets, by ONNX Runtime's names. They are
    /// what `dispatch` registers, what the build records in its metrics,
    /// and what the wiring tests check: one list, so none of those can
    /// drift from the others.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        match self {
            Provider::Cpu => Vec::new(),
            Provider::Cuda => vec![("device_id", "0".into())],
            Provider::TensorRt { int8, cache_dir } => {
                let dir = cache_dir.display().to_string();
                vec![
                    ("device_id", "0".into()),
                    ("trt_int8_enable", u8::from(*int8).to_string()),
                    ("trt_engine_cache_enable", "1".into()),
                    ("trt_engine_cache_path", dir.clone()),
                    ("trt_timing_cache_enable", "1".into()),
                    ("trt_timing_cache_path", dir),
                ]
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::TensorRt { .. } => "TensorrtExecutionProvider",
        }
    }

    /// Fails when the loaded ONNX Runtime library lacks this provider, as
    /// the CPU wheel lacks the GPU ones.
    pub fn check_available(&self) -> Result<(), EngineError> {
        use ort::ep::ExecutionProvider;
        runtime()?;
        let available = match self {
            Provider::Cpu => Ok(true),
            Provider::Cuda => ort::ep::CUDA::is_available(),
            Provider::TensorRt { .. } => ort::ep::TensorRT::is_available(),
        };
        match available {
            Ok(true) => Ok(()),
            Ok(false) => Err(EngineError::ProviderMissing { provider: self.name() }),
            Err(e) => Err(EngineError::Ort { doing: format!("looking for {}", self.name()), message: e.to_string() }),
        }
    }

    /// The registration: `options`, key by key, on this provider, failing
    /// the session rather than falling back to the CPU. None for the CPU,
    /// which ONNX Runtime always has.
    fn dispatch(&self) -> Option<ort::ep::ExecutionProviderDispatch> {
        use ort::ep::ArbitrarilyConfigurableExecutionProvider;
        fn configured<E: ArbitrarilyConfigurableExecutionProvider>(ep: E, options: &[(&str, String)]) -> E {
            options.iter().fold(ep, |ep, (key, value)| ep.with_arbitrary_config(key, value))
        }
        let options = self.options();
        let dispatch = match self {
            Provider::Cpu => return None,
            Provider::Cuda => configured(ort::ep::CUDA::default(), &options).build(),
            Provider::TensorRt { .. } => configured(ort::ep::TensorRT::default(), &options).build(),
        };
        Some(dispatch.error_on_failure())
    }
}

/// How many intra-op threads `threads = 0` means on this machine.
pub fn resolve_threads(threads: u32) -> usize {
    if threads > 0 {
        threads as usize
    } else {
        std::thread::available_parallelism().map_or(1, usize::from)
    }
}

/// An open model, ready to classify batches.
pub struct InferenceSession {
    session: Session,
    input_name: String,
    /// Set when the model's batch axis is fixed; shorter batches get padded.
    fixed_batch: Option<usize>,
    /// The output `run` returns: the first unless `score_with` says.
    scores: usize,
}

impl InferenceSession {
    /// Opens `model` on the CPU with every graph optimization on. When
    /// `save_optimized` is given, ONNX Runtime writes the optimized graph
    /// there: that file is the "engine" the CPU build produces.
    pub fn open(model: &Path, threads: usize, save_optimized: Option<&Path>) -> Result<Self, EngineError> {
        Self::open_with(model, threads, save_optimized, &Provider::Cpu)
    }

    /// Opens `model` on `provider`. A provider that cannot be registered is
    /// an error, never a silent fall-back to the CPU that would report CPU
    /// figures as GPU ones.
    pub fn open_with(
        model: &Path,
        threads: usize,
        save_optimized: Option<&Path>,
        provider: &Provider,
    ) -> Result<Self, EngineError> {
        let runtime = runtime()?;
        provider.check_available()?;
        let doing = format!("opening {}", model.display());
        let mut builder = Session::builder(&runtime.environment)
            .map_err(EngineError::ort(&doing))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| EngineError::ort(&doing)(e.into()))?
            .with_intra_threads(threads)
            .map_err(|e| EngineError::ort(&doing)(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| EngineError::ort(&doing)(e.into()))?;
        if let Some(path) = save_optimized {
            builder = builder.with_optimized_model_path(path).map_err(|e| EngineError::ort(&doing)(e.into()))?;
        }
        if let Some(dispatch) = provider.dispatch() {
            builder = builder.with_execution_providers([dispatch]).map_err(|e| EngineError::ort(&doing)(e.into()))?;
        }
        let session = builder.commit_from_file(model).map_err(EngineError::ort(&doing))?;
        let input = session
            .inputs()
            .first()
            .ok_or_else(|| EngineError::Ort { doing: doing.clone(), message: "the model has no inputs".into() })?;
        let input_name = input.name().to_string();
        let fixed_batch = input
            .dtype()
            .tensor_shape()
            .and_then(|shape| shape.first().copied())
            .filter(|&d| d > 0)
            .map(|d| d as usize);
        Ok(Self { session, input_name, fixed_batch, scores: 0 })
    }

    /// Makes `run` return the output named `name` (a model with several).
    pub fn score_with(&mut self, name: &str) -> Result<(), EngineError> {
        let names = self.output_names();
        self.scores = names.iter().position(|n| n == name).ok_or_else(|| EngineError::Ort {
            doing: "choosing the scores output".into(),
            message: format!("the model has no output `{name}` (it has: {})", names.join(", ")),
        })?;
        Ok(())
    }

    pub fn output_names(&self) -> Vec<String> {
        self.session.outputs().iter().map(|o| o.name().to_string()).collect()
    }

    /// Runs one batch and returns the scores output as [batch, classes].
    pub fn run(&mut self, batch: ArrayView4<'_, f32>) -> Result<Array2<f32>, EngineError> {
        let reading = |message: String| EngineError::Ort { doing: "reading the output".into(), message };
        let scores = self.scores;
        let logits = self.run_outputs(batch, |outputs| {
            let first = outputs.get(scores).ok_or_else(|| reading("the model has no outputs".into()))?;
            ndarray::ArrayView::from_shape(first.shape.clone(), first.values)
                .map(|v| v.to_owned())
                .map_err(|e| reading(e.to_string()))
        })??;
        logits.into_dimensionality::<ndarray::Ix2>().map_err(|e| reading(format!("expected [batch, classes]: {e}")))
    }

    /// The batch size the model's input fixes, if it does.
    pub fn fixed_batch(&self) -> Option<usize> {
        self.fixed_batch
    }

    /// Runs one batch and hands all its float outputs to `use_outputs` at
    /// once (so they can be processed in parallel), with rows that only
    /// padded a fixed batch cut off.
    pub fn run_outputs<T>(
        &mut self,
        batch: ArrayView4<'_, f32>,
        use_outputs: impl FnOnce(&[Output<'_>]) -> T,
    ) -> Result<T, EngineError> {
        let rows = batch.shape()[0];
        let padded;
        let input = match self.fixed_batch {
            Some(fixed) if fixed > rows => {
                let mut full =
                    ndarray::Array4::<f32>::zeros((fixed, batch.shape()[1], batch.shape()[2], batch.shape()[3]));
                full.slice_mut(s![..rows, .., .., ..]).assign(&batch);
                padded = full;
                padded.view()
            }
            _ => batch,
        };
        let tensor = TensorRef::from_array_view(input).map_err(EngineError::ort("preparing an input batch"))?;
        let session_outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(EngineError::ort("running a batch"))?;
        let mut outputs = Vec::with_capacity(session_outputs.len());
        for index in 0..session_outputs.len() {
            let (shape, values) =
                session_outputs[index].try_extract_tensor::<f32>().map_err(EngineError::ort("reading an output"))?;
            let mut shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            let full_rows = shape.first().copied().unwrap_or(0);
            let values = if full_rows > rows {
                // A fixed batch was padded: keep only the real rows.
                shape[0] = rows;
                &values[..rows * (values.len() / full_rows)]
            } else {
                values
            };
            outputs.push(Output { index, shape, values });
        }
        Ok(use_outputs(&outputs))
    }
}

/// One output of a batch, borrowed from ONNX Runtime's buffers.
pub struct Output<'a> {
    pub index: usize,
    pub shape: Vec<usize>,
    pub values: &'a [f32],
}

/// Top-1 and top-5 accuracy over a whole split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    pub top1: f64,
    /// None where the model scores fewer than 5 classes.
    pub top5: Option<f64>,
}

/// Top-1 and top-5 accuracy over a split in memory, in batches of `batch`.
pub fn accuracy(
    session: &mut InferenceSession,
    images: ArrayView4<'_, f32>,
    labels: &[i64],
    batch: usize,
    cancel: &AtomicBool,
) -> Result<Accuracy, EngineError> {
    accuracy_of_batches(session, images.axis_chunks_iter(Axis(0), batch).map(|b| Ok(b.into())), labels, cancel)
}

/// Top-1 and top-5 accuracy over a split that arrives batch by batch
/// (read from disk as it is needed), with one label per image.
pub fn accuracy_of_batches<'a, E: From<EngineError>>(
    session: &mut InferenceSession,
    batches: impl IntoIterator<Item = Result<ndarray::CowArray<'a, f32, ndarray::Ix4>, E>>,
    labels: &[i64],
    cancel: &AtomicBool,
) -> Result<Accuracy, E> {
    let (mut top1, mut top5, mut classes, mut seen) = (0usize, 0usize, 0usize, 0usize);
    for_each_scores(session, batches, cancel, |scores| {
        for row in scores.outer_iter() {
            let label = labels[seen];
            seen += 1;
            let row = row.to_vec();
            classes = row.len();
            if label < 0 || label as usize >= classes {
                return Err(EngineError::LabelOutOfRange { label, classes }.into());
            }
            let rank = rank_of(&row, label as usize);
            top1 += usize::from(rank == 0);
            top5 += usize::from(rank < 5);
        }
        Ok(())
    })?;
    let share = |n: usize| n as f64 / labels.len().max(1) as f64;
    Ok(Accuracy { top1: share(top1), top5: (classes >= 5).then(|| share(top5)) })
}

/// Runs each batch (borrowed from memory, or owned as read from disk),
/// handing its scores to `each`.
pub fn for_each_scores<'a, E: From<EngineError>>(
    session: &mut InferenceSession,
    batches: impl IntoIterator<Item = Result<ndarray::CowArray<'a, f32, ndarray::Ix4>, E>>,
    cancel: &AtomicBool,
    mut each: impl FnMut(ndarray::ArrayView2<'_, f32>) -> Result<(), E>,
) -> Result<(), E> {
    for batch in batches {
        if cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled.into());
        }
        each(session.run(batch?.view())?.view())?;
    }
    Ok(())
}

/// How closely a run's outputs follow fp32's on the same unlabelled
/// samples: the share whose top-1 class is fp32's, and the mean
/// signal-to-quantization-noise ratio of the scores, per sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Agreement {
    samples: usize,
    same_top1: usize,
    sqnr_db_sum: f64,
}

/// Where a sample's scores equal fp32's exactly, its SQNR counts as this
/// (an infinite one would swamp the mean).
pub const SQNR_CAP_DB: f64 = 120.0;

impl Agreement {
    /// Adds one sample's scores and fp32's.
    pub fn add(&mut self, scores: ndarray::ArrayView1<'_, f32>, reference: ndarray::ArrayView1<'_, f32>) {
        self.samples += 1;
        self.same_top1 += usize::from(argmax(scores) == argmax(reference));
        let signal: f64 = reference.iter().map(|&r| (r as f64).powi(2)).sum();
        let noise: f64 = scores.iter().zip(reference).map(|(&q, &r)| (q as f64 - r as f64).powi(2)).sum();
        let sqnr = if noise == 0.0 { SQNR_CAP_DB } else { (10.0 * (signal / noise).log10()).min(SQNR_CAP_DB) };
        self.sqnr_db_sum += sqnr;
    }

    /// The share of samples whose top-1 is fp32's.
    pub fn top1(&self) -> f64 {
        self.same_top1 as f64 / self.samples.max(1) as f64
    }

    pub fn mean_sqnr_db(&self) -> f64 {
        self.sqnr_db_sum / self.samples.max(1) as f64
    }
}

/// The first highest score's index, as argmax takes it.
pub fn argmax(scores: ndarray::ArrayView1<'_, f32>) -> usize {
    scores.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

/// How many classes rank above `label`: those scoring higher, and those
/// scoring the same at a lower index (argmax takes the first maximum).
fn rank_of(scores: &[f32], label: usize) -> usize {
    let score = scores[label];
    scores.iter().enumerate().filter(|&(i, &v)| v > score || (v == score && i < label)).count()
}

/// Latency and throughput at one batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub batch: usize,
    pub iterations: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    /// Images per second at this batch size.
    pub throughput: f64,
}

/// Times `iterations` runs of the same batch after `warmup` untimed ones.
pub fn measure_latency(
    session: &mut InferenceSession,
    batch: ArrayView4<'_, f32>,
    warmup: usize,
    iterations: usize,
    cancel: &AtomicBool,
) -> Result<LatencyStats, EngineError> {
    // Ctrl-C, SIGTERM and the stage's timeout set `cancel`: both loops
    // look at it before every run.
    let stopped = || cancel.load(Ordering::Relaxed);
    for _ in 0..warmup {
        if stopped() {
            return Err(EngineError::Cancelled);
        }
        session.run(batch)?;
    }
    let mut times_ms = Vec::new();
    for _ in 0..iterations {
        if stopped() {
            return Err(EngineError::Cancelled);
        }
        let start = Instant::now();
        session.run(batch)?;
        times_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(summarize(batch.shape()[0], times_ms))
}

fn summarize(batch: usize, mut times_ms: Vec<f64>) -> LatencyStats {
    times_ms.sort_by(f64::total_cmp);
    let mean_ms = times_ms.iter().sum::<f64>() / times_ms.len().max(1) as f64;
    LatencyStats {
        batch,
        iterations: times_ms.len(),
        p50_ms: percentile(&times_ms, 50.0),
        p90_ms: percentile(&times_ms, 90.0),
        p99_ms: percentile(&times_ms, 99.0),
        mean_ms,
        throughput: if mean_ms > 0.0 { batch as f64 * 1e3 / mean_ms } else { 0.0 },
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let stats = summarize(4, (1..=100).map(f64::from).collect());
        assert_eq!((stats.p50_ms, stats.p90_ms, stats.p99_ms), (50.0, 90.0, 99.0));
        assert!((stats.mean_ms - 50.5).abs() < 1e-9);
        assert!((stats.throughput - 4.0 * 1e3 / 50.5).abs() < 1e-9);
    }

    /// TensorRT builds int8 engines only when asked and caches them in the
    /// build artifact, so evaluation reuses the engine the build made.
    #[test]
    fn tensorrt_options_enable_int8_and_cache_the_engine_in_the_artifact() {
        let dir = Path::new("/results/artifacts/abc");
        let options = Provider::for_engine(Engine::Tensorrt, true, dir).options();
        let get = |key: &str| options.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("trt_int8_enable"), Some("1"));
        assert_eq!(get("trt_engine_cache_enable"), Some("1"));
        assert_eq!(get("trt_engine_cache_path"), Some("/results/artifacts/abc"));
        assert_eq!(get("trt_timing_cache_path"), Some("/results/artifacts/abc"));
        let fp32 = Provider::for_engine(Engine::Tensorrt, false, dir).options();
        assert!(fp32.contains(&("trt_int8_enable", "0".to_string())));
        assert_eq!(Provider::for_engine(Engine::Cuda, true, dir).options(), [("device_id", "0".to_string())]);
        assert_eq!(Provider::for_engine(Engine::Cpu, true, dir), Provider::Cpu);
    }

    /// What `dispatch` registers is the provider each engine names: the
    /// CPU registers nothing (ONNX Runtime's default), and a GPU engine
    /// registers its own provider, whose options are `options` (it has no
    /// other source).
    #[test]
    fn dispatch_registers_each_engines_own_provider() {
        let dir = Path::new("/results/artifacts/abc");
        for engine in [Engine::Cpu, Engine::Cuda, Engine::Tensorrt] {
            let provider = Provider::for_engine(engine, true, dir);
            let registered = provider.dispatch().map(|d| d.name());
            let expected = (provider != Provider::Cpu).then_some(provider.name());
            assert_eq!(registered, expected, "{engine:?}");
        }
    }

    #[test]
    fn ranks_follow_argmax_on_ties() {
        let scores = [0.1, 3.0, -1.0, 3.0, 2.0, 0.5, 0.0];
        assert_eq!(rank_of(&scores, 1), 0, "the first maximum is top-1");
        assert_eq!(rank_of(&scores, 3), 1);
        assert_eq!(rank_of(&scores, 4), 2);
        assert_eq!(rank_of(&scores, 2), 6);
    }
}
