//! Helpers shared by the integration tests, which drive the real `qsweep`
//! binary against the real dataset and a real ONNX Runtime.

#![allow(dead_code)]

pub mod redis_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn qsweep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qsweep")).args(args).output().expect("qsweep starts")
}

pub fn reference_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/models/fashion-resnet8.onnx")
}

pub fn reference_spec() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/fashion-resnet.json")
}

/// A spec for the reference model, with quick evaluation settings; `extra`
/// is spliced in as more top-level fields.
pub fn quick_spec_json(extra: &str) -> String {
    format!(
        r#"{{
  "name": "quick",
  "model": "{}",
  "data": {{ "preprocess": {{ "mean": [0.2860], "std": [0.3530] }} }},
  "evaluate": {{ "batch_sizes": [1, 64], "warmup": 2, "iterations": 20, "threads": 1 }}{}
}}"#,
        reference_model().display(),
        if extra.is_empty() { String::new() } else { format!(",\n  {extra}") }
    )
}

/// `quick_spec_json`'s spec measured on `engine` (`cpu`, `cuda`, `tensorrt`).
pub fn quick_spec_on(engine: &str) -> String {
    quick_spec_json("").replace(r#""threads": 1"#, &format!(r#""threads": 1, "engine": "{engine}""#))
}

/// Whether the loaded ONNX Runtime library has `provider`, asked of ONNX
/// Runtime itself (its list of available providers), not of the qsweep
/// code whose refusals the tests check.
pub fn library_has(provider: &qsweep::engine::Provider) -> bool {
    use ort::ep::ExecutionProvider;
    qsweep::engine::runtime().expect("ONNX Runtime (run scripts/setup)");
    match provider {
        qsweep::engine::Provider::Cpu => true,
        qsweep::engine::Provider::Cuda => ort::ep::CUDA::is_available().unwrap(),
        qsweep::engine::Provider::TensorRt { .. } => ort::ep::TensorRT::is_available().unwrap(),
    }
}

/// `quick_spec_json`'s spec with evaluation counts at the schema's
/// maxima: an evaluation that runs for many minutes, for tests that stop
/// one (warm-up first, so a stop lands in the warm-up loop too).
pub fn endless_evaluation(spec_json: &str) -> String {
    spec_json.replace(r#""warmup": 2"#, r#""warmup": 10000"#).replace(r#""iterations": 20"#, r#""iterations": 100000"#)
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// The staging directories (work in progress) in a results directory.
pub fn staging_dirs(results: &Path) -> Vec<String> {
    std::fs::read_dir(results.join("artifacts"))
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(".staging-"))
                .collect()
        })
        .unwrap_or_default()
}

/// The rows of a results directory's runs.csv.
pub fn csv_rows(results: &Path) -> Vec<csv::StringRecord> {
    csv::Reader::from_path(results.join("runs.csv")).unwrap().records().map(Result::unwrap).collect()
}

/// The images (normalized, as stages read them) and labels of the
/// prepare-data artifact `key` in a results directory.
pub fn prepared_images(results: &Path, key: &str) -> (ndarray::ArrayD<f32>, Option<Vec<i64>>) {
    let manifest = qsweep::store::ResultsDir::open(results)
        .manifest(&qsweep::plan::TaskKey(key.into()))
        .unwrap_or_else(|| panic!("no manifest for {key}"));
    let dir = results.join("artifacts").join(key);
    let set = qsweep::data::prepared::PreparedSet::open(&dir, &manifest.files).unwrap();
    let images = set.read(&(0..set.len()).collect::<Vec<_>>()).unwrap();
    (images, set.labels().unwrap())
}
