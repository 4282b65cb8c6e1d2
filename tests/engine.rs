//! Opening sessions on execution providers with the real ONNX Runtime.
//!
//! The GPU tests hold on any host: ONNX Runtime is asked which providers
//! the loaded library has, and a provider it has must open and run, while
//! one it lacks must be refused by name (never a silent run on the CPU).

mod common;

use common::*;
use qsweep::engine::{EngineError, InferenceSession, Provider};

/// A session on each provider opens and classifies a batch as the CPU does
/// where the library has the provider, and fails naming it where it does
/// not.
#[test]
fn gpu_providers_run_where_the_library_has_them_and_are_refused_by_name_where_not() {
    let model = reference_model();
    let dir = tempfile::tempdir().unwrap();
    let batch = ndarray::Array4::<f32>::from_shape_fn((4, 1, 28, 28), |(n, _, y, x)| ((n + y * x) % 7) as f32 / 7.0);
    let cpu = InferenceSession::open_with(&model, 1, None, &Provider::Cpu).unwrap().run(batch.view()).unwrap();
    for provider in [Provider::Cuda, Provider::TensorRt { int8: false, cache_dir: dir.path().to_path_buf() }] {
        match (library_has(&provider), InferenceSession::open_with(&model, 1, None, &provider)) {
            (true, Ok(mut session)) => {
                let scores = session.run(batch.view()).unwrap();
                let top1 = |s: &ndarray::Array2<f32>| {
                    s.rows().into_iter().map(|r| argmax(r.as_slice().unwrap())).collect::<Vec<_>>()
                };
                assert_eq!(top1(&scores), top1(&cpu), "{} disagrees with the CPU", provider.name());
            }
            (false, Err(EngineError::ProviderMissing { provider: name })) => assert_eq!(name, provider.name()),
            (has, Err(other)) => panic!("{} (library has it: {has}): unexpected error {other}", provider.name()),
            (false, Ok(_)) => panic!("{} opened although the library lacks it", provider.name()),
        }
    }
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap()
}

/// `qsweep run` with a GPU engine: where the library has TensorRT the
/// sweep runs on it (the build records its provider); where not, a set-up
/// error (exit 2) that names the provider and the fix, before anything is
/// written.
#[test]
fn a_gpu_sweep_runs_on_its_provider_or_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &quick_spec_on("tensorrt"));
    let results = dir.path().join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    let err = stderr(&output);
    let tensorrt = Provider::TensorRt { int8: false, cache_dir: dir.path().to_path_buf() };
    if library_has(&tensorrt) {
        assert_eq!(output.status.code(), Some(0), "{err}");
        let builds: Vec<serde_json::Value> = std::fs::read_dir(results.join("artifacts"))
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("manifest.json")).ok())
            .map(|text| serde_json::from_str::<serde_json::Value>(&text).unwrap())
            .filter(|m| m["stage"] == "build")
            .collect();
        assert!(!builds.is_empty());
        assert!(builds.iter().all(|m| m["metrics"]["provider"] == "TensorrtExecutionProvider"), "{builds:?}");
    } else {
        assert_eq!(output.status.code(), Some(2), "{err}");
        assert!(err.contains("has no TensorrtExecutionProvider") && err.contains("onnxruntime-gpu"), "{err}");
        assert!(!results.exists());
    }
}
