//! Models as PyTorch's exporter writes them. Without dynamic axes the
//! batch is fixed at 1 (tests/fixtures/graphs/make_fixed_batch.py): freed
//! where the graph allows, else measured at batch 1 only and said so. With
//! several outputs, `evaluate.output` picks the scores.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/graphs").join(name)
}

fn spec_for(dir: &Path, model: &Path) -> PathBuf {
    spec_with(dir, model, "")
}

fn spec_with(dir: &Path, model: &Path, extra: &str) -> PathBuf {
    let text = quick_spec_json(&format!(r#""matrix": {{ "calibration": ["max"] }}{extra}"#))
        .replace(&reference_model().display().to_string(), &model.display().to_string());
    write(dir, "fixed.json", &text)
}

fn evaluations(results: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(results.join("runs.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["evaluation"].clone())
        .collect()
}

#[test]
fn a_flatten_export_runs_every_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(dir.path(), &fixture("fixed_batch_flatten.onnx"));
    let results = dir.path().join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(!stderr(&output).contains("note:"), "{}", stderr(&output));
    for evaluation in evaluations(&results) {
        let batches: Vec<u64> =
            evaluation["latency"].as_array().unwrap().iter().map(|l| l["batch"].as_u64().unwrap()).collect();
        assert_eq!(batches, [1, 64]);
        assert!(evaluation["fixed_batch"].is_null(), "{evaluation}");
        assert_eq!(evaluation["accuracy_batch"], 64);
    }
}

#[test]
fn a_hard_coded_batch_is_measured_at_batch_one_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(dir.path(), &fixture("fixed_batch_view.onnx"));
    let validate = qsweep(&["validate", spec.to_str().unwrap()]);
    assert_eq!(validate.status.code(), Some(0), "{}", stderr(&validate));
    let note = stderr(&validate);
    assert!(note.contains("fixed at 1") && note.contains("hard-codes the shape [1, -1]"), "{note}");
    let results = dir.path().join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    for evaluation in evaluations(&results) {
        let batches: Vec<u64> =
            evaluation["latency"].as_array().unwrap().iter().map(|l| l["batch"].as_u64().unwrap()).collect();
        assert_eq!(batches, [1]);
        assert_eq!(evaluation["fixed_batch"], 1);
    }
    let summary = std::fs::read_to_string(results.join("summary.md")).unwrap();
    assert!(summary.contains("batch axis is fixed at 1"), "{summary}");
}

#[test]
fn evaluate_output_picks_the_scores_of_a_model_with_several() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("shared_biases_two_outputs.onnx");
    // `output` goes into the quick spec's own `evaluate` (a second
    // `evaluate` key would be refused as given twice).
    let validate = |output: &str| {
        let spec = spec_with(dir.path(), &model, "");
        let text = std::fs::read_to_string(&spec).unwrap().replace(
            r#""evaluate": { "batch_sizes": [1, 64], "warmup": 2, "iterations": 20"#,
            &format!(r#""evaluate": {{ "output": "{output}", "batch_sizes": [64], "warmup": 2, "iterations": 2"#),
        );
        assert!(text.contains(output), "the quick spec's evaluate changed");
        std::fs::write(&spec, text).unwrap();
        let output = qsweep(&["validate", spec.to_str().unwrap()]);
        (output.status.code(), stderr(&output), spec)
    };
    let (code, err, _) = validate("nope");
    assert_eq!(code, Some(2));
    assert!(err.contains("no output `nope`; its outputs are: logits, features"), "{err}");
    // The features are 8 wide: not the 10 classes' scores.
    let (code, err, _) = validate("features");
    assert_eq!(code, Some(2));
    assert!(err.contains("scores 8 classes"), "{err}");

    let (code, err, spec) = validate("logits");
    assert_eq!(code, Some(0), "{err}");
    let results = dir.path().join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(csv_rows(&results).len(), 2);
}
