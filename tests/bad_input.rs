//! Bad input gets a clear error that names the file, the JSON path, the
//! line and column, what was expected and a fix; exits 2; and writes
//! nothing.

mod common;

use std::path::Path;

use candle_onnx::onnx;
use common::*;
use prost::Message;

/// Runs `qsweep run` on a spec and checks the common contract of bad input:
/// exit code 2 and no results directory. Returns stderr.
fn refused(spec_text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    refused_in(dir.path(), spec_text)
}

fn refused_in(dir: &Path, spec_text: &str) -> String {
    let spec = write(dir, "spec.json", spec_text);
    let results = dir.join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {err}");
    assert!(!results.exists(), "nothing may be written for bad input");
    let validated = qsweep(&["validate", spec.to_str().unwrap()]);
    assert_eq!(validated.status.code(), Some(2));
    assert_eq!(stderr(&validated), err, "validate and run report the same errors");
    assert!(err.contains("spec.json"), "the error names the file: {err}");
    assert!(err.contains("fix:"), "the error says what to do: {err}");
    err
}

#[test]
fn malformed_json_points_at_the_spot() {
    let err = refused("{\n  \"name\": \"x\"\n  \"model\": \"m.onnx\"\n}");
    assert!(err.contains("spec.json:3:3"), "{err}");
    assert!(err.contains("malformed JSON"), "{err}");
}

#[test]
fn unknown_field_suggests_the_right_name() {
    let err = refused(&quick_spec_json("\"retreis\": 2"));
    assert!(err.contains("$.retreis: unknown field `retreis`"), "{err}");
    assert!(err.contains("did you mean `retries`?"), "{err}");
    assert!(err.contains("spec.json:6:3: $.retreis"), "line and column of the key: {err}");
}

#[test]
fn wrong_type_says_what_was_expected() {
    let err = refused(&quick_spec_json("\"retries\": \"two\""));
    assert!(err.contains("$.retries: \"two\" has the wrong type"), "{err}");
    assert!(err.contains("expected: an integer"), "{err}");
}

#[test]
fn unknown_calibration_method_lists_the_methods() {
    let err = refused(&quick_spec_json(r#""matrix": { "calibration": ["mse", "histogram"] }"#));
    assert!(err.contains("$.matrix.calibration[1]: \"histogram\" is not an allowed value"), "{err}");
    assert!(err.contains(r#"expected: one of "max", "mse", "entropy", "percentile""#), "{err}");
}

#[test]
fn every_error_is_reported_at_once() {
    let err = refused(&quick_spec_json(r#""retries": -1, "timeout": "soon", "colour": 1"#));
    assert!(err.contains("has 3 errors"), "{err}");
    for path in ["$.retries", "$.timeout", "$.colour"] {
        assert!(err.contains(path), "{path} missing from: {err}");
    }
}

#[test]
fn a_sweep_with_no_run_is_refused() {
    let err = refused(&quick_spec_json(r#""baselines": []"#));
    assert!(err.contains("the sweep has no run"), "{err}");
}

#[test]
fn exclude_removing_everything_is_refused() {
    let err = refused(&quick_spec_json(
        r#""baselines": [], "matrix": { "calibration": ["max"] }, "exclude": [{ "calibration": "max" }]"#,
    ));
    assert!(err.contains("`exclude` removes every run"), "{err}");
}

/// A learning rate or epoch count that is negative or absurd is a spec error.
#[test]
fn absurd_qat_recipes_are_refused() {
    let err = refused(&quick_spec_json(
        r#""matrix": { "calibration": ["mse"], "qat_epochs": [5000] }, "qat": { "learning_rate": -0.1 }"#,
    ));
    assert!(err.contains("$.matrix.qat_epochs[0]"), "{err}");
    assert!(err.contains("$.qat.learning_rate"), "{err}");
    let err = refused(&quick_spec_json(r#""matrix": { "calibration": ["mse"], "qat_epochs": [-2] }"#));
    assert!(err.contains("$.matrix.qat_epochs[0]"), "{err}");
    let err = refused(&quick_spec_json(
        r#""matrix": { "calibration": ["mse"], "qat_epochs": [2] }, "qat": { "learning_rate": 5 }"#,
    ));
    assert!(err.contains("$.qat.learning_rate"), "{err}");
}

/// `qsweep run` with REDIS_URL in its environment, and `args` after the spec.
fn run_with_redis_url(dir: &Path, url: Option<&str>, args: &[&str]) -> (Option<i32>, String) {
    let spec = write(dir, "spec.json", &quick_spec_json(""));
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_qsweep"));
    command.args(["run", spec.to_str().unwrap(), "--results", dir.join("results").to_str().unwrap()]).args(args);
    match url {
        Some(url) => command.env("REDIS_URL", url),
        None => command.env_remove("REDIS_URL"),
    };
    let output = command.output().unwrap();
    (output.status.code(), stderr(&output))
}

/// REDIS_URL keeps the password off the command line: `--redis` alone
/// reads it; set without `--redis` it is refused rather than silently
/// ignored by a local run; and no message shows its password.
#[test]
fn redis_url_comes_from_the_environment_and_stays_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let secret_url = "redis://:s3cret@127.0.0.1:1";

    let (code, err) = run_with_redis_url(dir.path(), Some(secret_url), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("REDIS_URL is set, but without --redis"), "{err}");
    assert!(!dir.path().join("results").exists(), "nothing may be written");

    let (code, err) = run_with_redis_url(dir.path(), None, &["--redis"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--redis without a URL reads REDIS_URL, which is not set"), "{err}");

    // `--redis` alone connects to REDIS_URL's host (nothing listens on port 1).
    let (code, err) = run_with_redis_url(dir.path(), Some(secret_url), &["--redis"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("127.0.0.1:1") && !err.contains("s3cret"), "{err}");
    assert!(!dir.path().join("results").exists(), "an unreachable Redis is a set-up error: nothing may be written");

    // A malformed URL (one slash) is not echoed with its password either.
    let output = qsweep(&["status", "quick", "--redis", "redis:/:s3cret@127.0.0.1:1"]);
    assert_ne!(output.status.code(), Some(0));
    assert!(!stderr(&output).contains("s3cret"), "{}", stderr(&output));
}

/// A key given twice is an error naming both lines, not a silent "last
/// one wins".
#[test]
fn a_key_given_twice_names_both_lines() {
    let text = quick_spec_json("").replacen("\n  \"data\"", "\n  \"name\": \"again\",\n  \"data\"", 1);
    let err = refused(&text);
    assert!(err.contains("spec.json:4:3") && err.contains("`name` is given twice: first at line 2"), "{err}");
}

/// Counts that would not fit in memory or never end (found by trying
/// u32::MAX) are refused with the field and its bound.
#[test]
fn evaluation_counts_have_upper_bounds() {
    let spec = quick_spec_json("")
        .replace(r#""warmup": 2"#, r#""warmup": 4294967295"#)
        .replace(r#""iterations": 20"#, r#""iterations": 4294967295"#)
        .replace(r#""threads": 1"#, r#""threads": 4294967295"#);
    let err = refused(&spec);
    for (field, bound) in [("warmup", "10000"), ("iterations", "100000"), ("threads", "1024")] {
        assert!(err.contains(&format!("$.evaluate.{field}")) && err.contains(&format!("at most {bound}")), "{err}");
    }
    let spec = quick_spec_json("").replace(
        r#""preprocess": { "mean""#,
        r#""preprocess": { "resize": [28, 4294967295], "center_crop": 4294967295, "mean""#,
    );
    let err = refused(&spec);
    assert!(err.contains("$.data.preprocess.resize") && err.contains("$.data.preprocess.center_crop"), "{err}");
}

/// An operator the trainer cannot run is named, with its node, at validation.
#[test]
fn qat_of_a_model_with_an_unsupported_operator_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("softsign.onnx");
    std::fs::write(&model, single_node_model("Softsign", 17, &[1, 28, 28], &[1, 28, 28])).unwrap();
    let text = quick_spec_json(r#""matrix": { "calibration": ["max"], "qat_epochs": [1] }"#)
        .replace(reference_model().to_str().unwrap(), model.to_str().unwrap());
    let err = refused_in(dir.path(), &text);
    assert!(
        err.contains("QAT cannot fine-tune this model: node Softsign#0: operator Softsign is not supported"),
        "{err}"
    );
}

#[test]
fn quantizing_a_model_older_than_opset_13_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("old.onnx");
    std::fs::write(&model, conv_model(11)).unwrap();
    let text = quick_spec_json(r#""matrix": { "calibration": ["max"] }"#)
        .replace(reference_model().to_str().unwrap(), model.to_str().unwrap());
    let err = refused_in(dir.path(), &text);
    assert!(err.contains("the model uses opset 11"), "{err}");
    assert!(err.contains("opset_version=13"), "{err}");
}

#[test]
fn quantizing_a_model_with_nothing_to_quantize_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("identity.onnx");
    std::fs::write(&model, single_node_model("Identity", 17, &[1, 28, 28], &[1, 28, 28])).unwrap();
    let text = quick_spec_json(r#""matrix": { "calibration": ["max"] }"#)
        .replace(reference_model().to_str().unwrap(), model.to_str().unwrap());
    let err = refused_in(dir.path(), &text);
    assert!(err.contains("no Conv, Gemm or MatMul node"), "{err}");
}

#[test]
fn missing_model_file() {
    let text = quick_spec_json("").replace(reference_model().to_str().unwrap(), "/nonexistent/model.onnx");
    let err = refused(&text);
    assert!(err.contains("$.model") && err.contains("/nonexistent/model.onnx"), "{err}");
}

/// A FIFO given as the model or as a tensor file is refused at once,
/// named, instead of blocking `validate` until something writes to it.
#[test]
fn a_fifo_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.onnx");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let text = quick_spec_json("").replace(reference_model().to_str().unwrap(), fifo.to_str().unwrap());
    let err = refused_in(dir.path(), &text);
    assert!(err.contains("model.onnx") && err.contains("FIFO"), "{err}");

    let tensors = dir.path().join("calibration.npy");
    assert!(std::process::Command::new("mkfifo").arg(&tensors).status().unwrap().success());
    let text = quick_spec_json(r#""matrix": { "calibration": ["max"], "residual_fusion": [true] }"#).replace(
        r#""data": { "preprocess""#,
        &format!(r#""data": {{ "calibration": {{ "tensors": "{}" }}, "preprocess""#, tensors.display()),
    );
    let err = refused_in(dir.path(), &text);
    assert!(err.contains("calibration.npy") && err.contains("FIFO"), "{err}");
}

#[test]
fn corrupt_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = write(dir.path(), "model.onnx", "this is not protobuf at all, just text");
    let text = quick_spec_json("").replace(reference_model().to_str().unwrap(), model.to_str().unwrap());
    let err = refused_in(dir.path(), &text);
    assert!(err.contains("is not a valid ONNX model"), "{err}");
}

#[test]
fn model_whose_input_does_not_match_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("rgb.onnx");
    std::fs::write(&model, single_node_model("Identity", 17, &[3, 32, 32], &[3, 32, 32])).unwrap();
    let text = quick_spec_json("").replace(reference_model().to_str().unwrap(), model.to_str().unwrap());
    let err = refused_in(dir.path(), &text);
    assert!(err.contains("has shape [N, 3, 32, 32], but fashion-mnist images are [batch, 1, 28, 28]"), "{err}");
}

#[test]
fn missing_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let text = quick_spec_json("")
        .replace(r#""data": { "#, &format!(r#""data": {{ "dir": "{}", "#, dir.path().join("no-such-dir").display()));
    let err = refused_in(dir.path(), &text);
    assert!(err.contains("the fashion-mnist dataset is missing"), "{err}");
    assert!(err.contains("apt-get install dataset-fashion-mnist"), "{err}");
}

#[test]
fn results_directory_that_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &quick_spec_json(""));
    let blocker = write(dir.path(), "a-file", "");
    let results = blocker.join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("cannot write results to") && err.contains("--results"), "{err}");
}

#[test]
fn bad_flags_exit_2() {
    assert_eq!(qsweep(&["run"]).status.code(), Some(2));
    assert_eq!(qsweep(&["run", "x.json", "--jobs", "0"]).status.code(), Some(2));
}

/// A one-node model with a dynamic batch axis.
fn single_node_model(op_type: &str, opset: i64, input: &[i64], output: &[i64]) -> Vec<u8> {
    model_with(op_type, opset, input, output, vec![], vec![])
}

/// A model with one 1x1 Conv from 1 to 10 channels.
fn conv_model(opset: i64) -> Vec<u8> {
    let weight = onnx::TensorProto {
        name: "w".into(),
        dims: vec![10, 1, 1, 1],
        data_type: 1,
        float_data: vec![0.5; 10],
        ..Default::default()
    };
    model_with("Conv", opset, &[1, 28, 28], &[10, 28, 28], vec!["w".into()], vec![weight])
}

fn model_with(
    op_type: &str,
    opset: i64,
    input: &[i64],
    output: &[i64],
    extra_inputs: Vec<String>,
    initializer: Vec<onnx::TensorProto>,
) -> Vec<u8> {
    use onnx::tensor_shape_proto::{dimension::Value as D, Dimension};
    let dims = |values: &[i64]| onnx::TensorShapeProto {
        dim: std::iter::once(Dimension { value: Some(D::DimParam("N".into())), denotation: String::new() })
            .chain(values.iter().map(|&v| Dimension { value: Some(D::DimValue(v)), denotation: String::new() }))
            .collect(),
    };
    let info = |name: &str, shape: &[i64]| onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(onnx::type_proto::Tensor {
                elem_type: 1,
                shape: Some(dims(shape)),
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    };
    onnx::ModelProto {
        ir_version: 8,
        opset_import: vec![onnx::OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(onnx::GraphProto {
            name: "tiny".into(),
            node: vec![onnx::NodeProto {
                op_type: op_type.into(),
                input: std::iter::once("x".to_string()).chain(extra_inputs).collect(),
                output: vec!["y".into()],
                ..Default::default()
            }],
            input: vec![info("x", input)],
            output: vec![info("y", output)],
            initializer,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `validate` only warns about a GPU engine this machine's ONNX Runtime
/// cannot run, since specs are often checked away from the cluster that
/// runs them (`run` refuses it: tests/engine.rs). Where the provider
/// exists, there is nothing to warn about.
#[test]
fn validate_warns_of_a_gpu_engine_this_machine_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &quick_spec_on("tensorrt"));
    let here = library_has(&qsweep::engine::Provider::TensorRt { int8: false, cache_dir: dir.path().to_path_buf() });
    let validated = qsweep(&["validate", spec.to_str().unwrap()]);
    assert_eq!(validated.status.code(), Some(0), "{}", stderr(&validated));
    let warning = stderr(&validated);
    assert_eq!(warning.contains("warning:"), !here, "{warning}");
    assert_eq!(warning.contains("has no TensorrtExecutionProvider"), !here, "{warning}");
}

#[test]
fn an_invalid_resource_quantity_is_refused() {
    let err = refused(&quick_spec_json(r#""resources": { "gpu": 1, "memory": "16GB" }"#));
    assert!(err.contains("$.resources.memory: \"16GB\" is not a Kubernetes quantity"), "{err}");
}

/// A missing ONNX Runtime library is a set-up error with one fix that says
/// how to get it, before anything is written.
#[test]
fn a_missing_onnx_runtime_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &quick_spec_json(""));
    let results = dir.path().join("results");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_qsweep"))
        .args(["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()])
        .env("ORT_DYLIB_PATH", dir.path().join("no-such-lib.so"))
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("ONNX Runtime library not found") && err.contains("scripts/setup"), "{err}");
    assert_eq!(err.matches("fix:").count(), 1, "{err}");
    assert!(!results.exists());
}

/// `quick_spec_json` with entropy and `float_layers`, and a sensitivity section.
fn fallback_spec(float_layers: &str, sensitivity: &str) -> String {
    quick_spec_json(&format!(
        r#""matrix": {{ "calibration": ["entropy"], "float_layers": {float_layers} }}, "sensitivity": {sensitivity}"#
    ))
}

/// Budgets, counts and sizes that cannot work are refused up front, each
/// naming its field.
#[test]
fn impossible_fallback_settings_are_refused_naming_the_field() {
    let err = refused(&fallback_spec("[100]", "{}"));
    assert!(err.contains("$.matrix.float_layers"), "{err}");
    assert!(err.contains("leaves 100 ops in float, but its recipe quantizes only 10"), "{err}");

    let err = refused(&fallback_spec(r#"["auto"]"#, "{}"));
    assert!(err.contains("$.matrix.float_layers") && err.contains("sensitivity.accuracy_budget is not set"), "{err}");

    // Fashion-MNIST's training split holds 60000, the calibration set 500.
    let err = refused(&fallback_spec("[1]", r#"{ "validation_samples": 59600 }"#));
    assert!(err.contains("$.sensitivity.validation_samples") && err.contains("59500 remain"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let fits = write(dir.path(), "spec.json", &fallback_spec("[1]", r#"{ "validation_samples": 59500 }"#));
    assert_eq!(qsweep(&["validate", fits.to_str().unwrap()]).status.code(), Some(0), "59500 is exactly what is left");

    let err = refused(&fallback_spec("[1]", r#"{ "fallback_precision": "fp16" }"#));
    assert!(err.contains("$.sensitivity.fallback_precision") && err.contains("onnxruntime-cpu"), "{err}");

    let err = refused(&fallback_spec("[1]", r#"{ "samples": 301, "validation_samples": 300 }"#));
    assert!(err.contains("$.sensitivity.samples") && err.contains("holds only 300"), "{err}");
}

/// JSON has no NaN, and 1e400 is not an f64: both are malformed JSON at
/// the value's spot (line 6 is the matrix and sensitivity line).
#[test]
fn a_budget_json_cannot_hold_is_malformed_json_at_its_spot() {
    let err = refused(&fallback_spec("[1]", r#"{ "accuracy_budget": NaN }"#));
    assert!(err.contains("spec.json:6:") && err.contains("malformed JSON: expected value"), "{err}");
    let err = refused(&fallback_spec("[1]", r#"{ "accuracy_budget": 1e400 }"#));
    assert!(err.contains("spec.json:6:") && err.contains("malformed JSON: number out of range"), "{err}");
}

/// A negative budget is refused, and the error names the budget.
#[test]
fn a_negative_budget_is_refused_naming_it() {
    let err = refused(&fallback_spec("[1]", r#"{ "accuracy_budget": -0.1 }"#));
    assert!(err.contains("$.sensitivity.accuracy_budget"), "{err}");
}

/// Without the field names, a negative budget is still refused.
#[test]
fn a_negative_budget_is_refused() {
    let err = refused(&fallback_spec("[1]", r#"{ "accuracy_budget": -0.1 }"#));
    assert!(err.contains("$.sensitivity") && err.contains("-0.1"), "{err}");
}

/// QAT's validation subset and augmentation: each mistake names its field.
#[test]
fn bad_qat_validation_and_augmentation_are_refused() {
    let qat = |section: &str| {
        quick_spec_json(&format!(
            r#""matrix": {{ "calibration": ["mse"], "qat_epochs": [1] }}, "qat": {{ {section} }}"#
        ))
    };
    // 60,000 training images, 59,000 fine-tuned on; the 500 calibration
    // images, drawn with the same seed, are among them: 1,000 are left.
    let err = refused(&qat(r#""samples": 59000, "validation_samples": 2000"#));
    assert!(err.contains("$.qat.validation_samples"), "{err}");
    assert!(err.contains("the validation subset is 2000 samples") && err.contains("only 1000 remain"), "{err}");
    assert!(err.contains("use at most 1000 validation samples"), "{err}");
    // Fine-tuning on every image leaves none: the advice is a size that fits.
    let err = refused(&qat(r#""samples": 60000"#));
    assert!(err.contains("the 60000 fine-tuning samples (qat.samples)") && err.contains("only 0 remain"), "{err}");
    assert!(err.contains("qat.samples of at most 57500 leaves 2000 for validation"), "{err}");

    let err = refused(&qat(r#""augment": ["horizontal_flip", "vertical_flip"]"#));
    assert!(err.contains("$.qat.augment[1]"), "{err}");
    assert!(
        err.contains("horizontal_flip") && err.contains("random_resized_crop"),
        "the allowed names are listed: {err}"
    );

    for scale in ["[0.0, 1.0]", "[0.5, 1.5]", "[0.9, 0.2]"] {
        let err = refused(&qat(&format!(r#""augment": [{{ "random_resized_crop": {{ "scale": {scale} }} }}]"#)));
        assert!(err.contains("$.qat.augment[0].random_resized_crop.scale"), "{scale}: {err}");
        assert!(err.contains("within (0, 1]"), "{scale}: {err}");
    }
    let err = refused(&qat(r#""augment": [{ "pad": 4 }, "horizontal_flip"]"#));
    assert!(err.contains("$.qat.augment[0]") && err.contains("no random_crop follows it"), "{err}");
    let err = refused(&qat(r#""augment": ["random_crop"]"#));
    assert!(err.contains("$.qat.augment[0]") && err.contains("without a pad"), "{err}");
    let err = refused(&qat(r#""augment": true"#));
    assert!(err.contains("$.qat.augment"), "{err}");
    assert!(err.contains(r#"[{"pad":2},"random_crop","horizontal_flip"]"#), "the field's own example: {err}");
    let err = refused(&qat(r#""learning_rate": "fast""#));
    assert!(err.contains("$.qat.learning_rate") && err.contains("auto"), "{err}");
}

/// A QAT spec reading the reference PIL-written image folders: evaluation
/// from `evaluation` (train/ or val/), training and calibration from val/,
/// each source with its `extra` fields.
fn folder_qat_spec(evaluation: &str, training_extra: &str, calibration_extra: &str) -> String {
    let folders = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/data/fashion-images");
    let source =
        |dir: &str, extra: &str| format!(r#"{{ "images": {:?}{extra} }}"#, folders.join(dir).to_str().unwrap());
    let text = quick_spec_json(
        r#""matrix": { "calibration": ["mse"], "qat_epochs": [1] }, "calibration": { "samples": 100 }, "qat": { "samples": 300, "validation_samples": 200 }"#,
    )
    .replace(
        r#""data": { "preprocess": { "mean": [0.2860], "std": [0.3530] } }"#,
        &format!(
            r#""data": {{ "preprocess": {{ "mean": [0.2860], "std": [0.3530], "color": "grey" }}, "evaluation": {}, "training": {}, "calibration": {} }}"#,
            source(evaluation, ""),
            source("val", training_extra),
            source("val", calibration_extra)
        ),
    );
    assert!(text.contains(r#""training""#));
    text
}

/// Validation drawn from the evaluation images would choose QAT's epoch on
/// the test split, whichever classes of them training lists.
#[test]
fn a_training_source_that_is_the_evaluation_source_is_refused() {
    for training in ["", r#", "classes": ["bag", "coat"]"#] {
        let err = refused(&folder_qat_spec("val", training, ""));
        assert!(err.contains("$.data.training") && err.contains("the evaluation source's images"), "{training}: {err}");
    }
}

/// Calibration and training listing one folder's images differently
/// number them differently, so QAT's validation draw could not hold the
/// calibration set out: refused, naming data.calibration.
#[test]
fn calibration_and_training_listing_one_folder_differently_are_refused() {
    let err = refused(&folder_qat_spec("train", r#", "classes": ["coat", "dress"]"#, ""));
    assert!(err.contains("$.data.calibration") && err.contains("list it differently"), "{err}");
    // Listed alike, the calibration set is held out and the spec is fine.
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &folder_qat_spec("train", "", ""));
    let validated = qsweep(&["validate", spec.to_str().unwrap()]);
    assert_eq!(validated.status.code(), Some(0), "{}", stderr(&validated));
}
