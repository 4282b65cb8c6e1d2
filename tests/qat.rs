//! QAT that never makes a model worse, run for real on the reference model
//! and Fashion-MNIST: a harmful recipe returns its PTQ start and the report
//! says so, `select: "last"` keeps the last epoch, the curve has a point
//! per epoch and one for the start, the validation subset shares no image
//! with the calibration and fine-tuning subsets, and the range test behind
//! `learning_rate: "auto"` is one cached task per model, data and format.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// A small QAT sweep: mse with fusion, PTQ and `epochs` of QAT on 512
/// images, validated on 256; `qat` adds to the `qat` section.
fn qat_spec(dir: &Path, name: &str, epochs: u32, qat: &str) -> PathBuf {
    let text = quick_spec_json(&format!(
        r#""matrix": {{ "calibration": ["mse"], "residual_fusion": [true], "qat_epochs": [0, {epochs}] }},
  "calibration": {{ "samples": 256 }},
  "qat": {{ "samples": 512, "batch_size": 64, "validation_samples": 256{qat} }}"#
    ));
    write(dir, name, &text)
}

fn run_ok(spec: &Path, results: &Path) -> String {
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    stderr(&output)
}

fn plan(results: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(results.join("plan.json")).unwrap()).unwrap()
}

fn tasks_of<'a>(plan: &'a Value, stage: &str) -> Vec<&'a Value> {
    plan["tasks"].as_array().unwrap().iter().filter(|t| t["stage"] == stage).collect()
}

fn manifest(results: &Path, task: &Value) -> Value {
    let key = qsweep::plan::TaskKey(task["key"].as_str().unwrap().to_string());
    let dir = qsweep::store::ResultsDir::open(results).artifact_dir(&key);
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// runs.csv's cell of `column` for run `id`.
fn cell(results: &Path, id: &str, column: &str) -> String {
    let mut reader = csv::Reader::from_path(results.join("runs.csv")).unwrap();
    let at = reader.headers().unwrap().iter().position(|h| h == column).expect(column);
    let row = reader.records().map(Result::unwrap).find(|r| &r[0] == id).expect(id);
    row[at].to_string()
}

#[test]
fn a_harmful_recipe_returns_its_ptq_start_and_the_report_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    run_ok(&qat_spec(dir.path(), "harmful.json", 2, r#", "learning_rate": 0.5"#), &results);

    let plan = plan(&results);
    let qat = tasks_of(&plan, "qat");
    assert_eq!(qat.len(), 1);
    let metrics = &manifest(&results, qat[0])["metrics"];
    let curve = metrics["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 3, "epochs + 1 points: {curve:?}");
    assert_eq!(curve.iter().map(|p| p["epoch"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(curve.iter().all(|p| p["top1"].is_number() && p["loss"].is_number() && p["learning_rate"].is_number()));
    assert!(
        curve[1..].iter().all(|p| p["correct"].as_u64() <= curve[0]["correct"].as_u64()),
        "a rate of 0.5 should not improve on PTQ: {curve:?}"
    );
    assert_eq!(metrics["kept_epoch"], 0);
    assert_eq!(metrics["learning_rate"], 0.5);
    assert!(tasks_of(&plan, "learning-rate").is_empty(), "a number needs no range test");

    // The run built its PTQ model: the same test top-1 as its PTQ twin.
    assert_eq!(cell(&results, "mse-fused-qat2", "qat_kept_epoch"), "0");
    assert_eq!(cell(&results, "mse-fused-qat2", "accuracy"), cell(&results, "mse-fused-ptq", "accuracy"));
    let summary = std::fs::read_to_string(results.join("summary.md")).unwrap();
    assert!(summary.contains("**`mse-fused-qat2` returned its PTQ start**"), "{summary}");
    assert!(summary.contains("try a lower `qat.learning_rate`"), "{summary}");
    let chart = std::fs::read_to_string(results.join("qat_validation.svg")).unwrap();
    assert!(chart.contains("mse-fused-qat2"), "the chart names the run");
    let html = std::fs::read_to_string(results.join("report.html")).unwrap();
    assert!(html.contains(r#""returned_start":true"#), "report.html carries the verdict");
}

#[test]
fn select_last_keeps_the_last_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    run_ok(&qat_spec(dir.path(), "last.json", 2, r#", "learning_rate": 0.5, "select": "last""#), &results);
    let plan = plan(&results);
    let metrics = &manifest(&results, tasks_of(&plan, "qat")[0])["metrics"];
    assert_eq!(metrics["kept_epoch"], 2);
    assert_eq!(metrics["curve"].as_array().unwrap().len(), 3);
    assert_eq!(cell(&results, "mse-fused-qat2", "qat_kept_epoch"), "2");
    // The damaged model is what was built.
    let (last, ptq): (f64, f64) = (
        cell(&results, "mse-fused-qat2", "accuracy").parse().unwrap(),
        cell(&results, "mse-fused-ptq", "accuracy").parse().unwrap(),
    );
    assert!(last < ptq, "epoch 2 at rate 0.5 ({last}) should be below PTQ ({ptq})");
    let summary = std::fs::read_to_string(results.join("summary.md")).unwrap();
    assert!(!summary.contains("returned its PTQ start"), "{summary}");
}

/// Indices into the training split that a prepare-data task drew.
fn drawn(results: &Path, plan: &Value, split: &str) -> HashSet<u64> {
    let task = tasks_of(plan, "prepare-data").into_iter().find(|t| t["params"]["split"] == split).expect(split);
    let key = qsweep::plan::TaskKey(task["key"].as_str().unwrap().to_string());
    let dir = qsweep::store::ResultsDir::open(results).artifact_dir(&key);
    let indices: Vec<u64> = serde_json::from_slice(&std::fs::read(dir.join("source_indices.json")).unwrap()).unwrap();
    indices.into_iter().collect()
}

#[test]
fn validation_shares_no_image_with_calibration_or_fine_tuning_and_auto_rates_are_cached() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let spec = qat_spec(dir.path(), "auto.json", 1, "");
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(r#""residual_fusion": [true]"#, r#""residual_fusion": [false, true]"#);
    std::fs::write(&spec, &text).unwrap();
    run_ok(&spec, &results);

    let plan = plan(&results);
    let validation = drawn(&results, &plan, "qat-validation");
    let calibration = drawn(&results, &plan, "calibration");
    let training = drawn(&results, &plan, "train");
    assert_eq!((validation.len(), calibration.len(), training.len()), (256, 256, 512));
    assert!(validation.is_disjoint(&calibration), "validation and calibration share images");
    assert!(validation.is_disjoint(&training), "validation and fine-tuning share images");
    // The test split is another file; a spec whose training source is the
    // evaluation source is refused (tests/bad_input.rs).

    // One range test serves both QAT runs, and each used its pick.
    let tested = tasks_of(&plan, "learning-rate");
    assert_eq!(tested.len(), 1);
    let range = manifest(&results, tested[0]);
    let chosen = range["metrics"]["learning_rate"].as_f64().unwrap();
    let candidates = range["metrics"]["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 4);
    let rank = |c: &Value| (c["correct"].as_u64().unwrap(), -c["loss"].as_f64().unwrap());
    let best = candidates.iter().map(rank).fold((0, f64::NEG_INFINITY), |a, b| if b > a { b } else { a });
    let first_best = candidates.iter().find(|c| rank(c) == best).unwrap();
    assert_eq!(first_best["learning_rate"].as_f64(), Some(chosen), "most right answers, then lowest loss");
    for qat in tasks_of(&plan, "qat") {
        assert!(qat["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["role"] == "learning_rate" && i["key"] == tested[0]["key"]));
        let metrics = &manifest(&results, qat)["metrics"];
        assert_eq!(metrics["learning_rate"].as_f64(), Some(chosen));
        assert_eq!(metrics["learning_rate_from"], "range test");
    }

    // Another sweep of the same model, data and format, with other
    // recipes, reuses the range test; another format needs its own.
    let more =
        write(dir.path(), "more.json", &text.replace(r#""calibration": ["mse"]"#, r#""calibration": ["mse", "max"]"#));
    run_ok(&more, &results);
    assert_eq!(manifest(&results, tested[0]), range, "the range test was not redone");
    let again = plan_json(&more);
    assert_eq!(tasks_of(&again, "learning-rate")[0]["key"], tested[0]["key"]);
    let tensorrt = write(
        dir.path(),
        "trt.json",
        &text.replace(r#""name": "quick""#, r#""name": "quick", "int8_format": "tensorrt""#),
    );
    let other = plan_json(&tensorrt);
    assert_ne!(tasks_of(&other, "learning-rate")[0]["key"], tested[0]["key"]);
}

/// `qsweep plan --json` of a spec.
fn plan_json(spec: &Path) -> Value {
    let output = qsweep(&["plan", spec.to_str().unwrap(), "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}
