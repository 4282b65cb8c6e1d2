//! Training and QAT on the real Fashion-MNIST data: a small model's loss
//! falls, a checkpoint resumes (and a torn one starts over), a NaN loss
//! stops at its step or returns the kept epoch, and a QAT
//! sweep's exported Q/DQ model agrees with the interpreter in ONNX Runtime.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_onnx::onnx;
use common::*;
use qsweep::data::{self, Split};
use qsweep::spec::{Dataset, Preprocess};
use qsweep::train::fit::{self, Examples, Recipe};
use qsweep::train::network::{predictions, BatchNorm, Network};
use qsweep::train::TrainError;

fn examples(split: Split, count: usize) -> Examples {
    let raw = data::load_split(Dataset::FashionMnist, Path::new(Dataset::FashionMnist.default_dir()), split).unwrap();
    let preprocess = Preprocess { scale: 255.0, mean: vec![0.2860], std: vec![0.3530], ..Default::default() };
    let indices: Vec<usize> = (0..count.min(raw.count)).collect();
    raw.preprocess(&preprocess, Some(&indices)).into()
}

fn tensor(name: &str, dims: &[i64], values: Vec<f32>) -> onnx::TensorProto {
    onnx::TensorProto { name: name.into(), dims: dims.to_vec(), data_type: 1, float_data: values, ..Default::default() }
}

fn node(op: &str, inputs: &[&str], output: &str, attributes: Vec<onnx::AttributeProto>) -> onnx::NodeProto {
    onnx::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attributes,
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> onnx::AttributeProto {
    onnx::AttributeProto { name: name.into(), r#type: 7, ints: values.to_vec(), ..Default::default() }
}

/// Conv(1->8, 3x3) + BatchNorm + Relu + MaxPool + GlobalAveragePool + Gemm(8->10),
/// with seeded small random weights.
fn small_model() -> onnx::ModelProto {
    let noise = |n: usize, seed: u64, scale: f32| -> Vec<f32> {
        (0..n).map(|i| ((((i as u64 + 1) * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5) * scale).collect()
    };
    let info = |name: &str| onnx::ValueInfoProto { name: name.into(), ..Default::default() };
    let graph = onnx::GraphProto {
        node: vec![
            node("Conv", &["x", "w"], "c", vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])]),
            node("BatchNormalization", &["c", "gamma", "beta", "mean", "var"], "b", vec![]),
            node("Relu", &["b"], "r", vec![]),
            node(
                "MaxPool",
                &["r"],
                "p",
                vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2]), ints("pads", &[1, 1, 1, 1])],
            ),
            node("GlobalAveragePool", &["p"], "g", vec![]),
            node("Flatten", &["g"], "f", vec![]),
            node(
                "Gemm",
                &["f", "fc_w", "fc_b"],
                "logits",
                vec![onnx::AttributeProto { name: "transB".into(), r#type: 2, i: 1, ..Default::default() }],
            ),
        ],
        initializer: vec![
            tensor("w", &[8, 1, 3, 3], noise(72, 1, 0.6)),
            tensor("gamma", &[8], vec![1.0; 8]),
            tensor("beta", &[8], vec![0.0; 8]),
            tensor("mean", &[8], vec![0.0; 8]),
            tensor("var", &[8], vec![1.0; 8]),
            tensor("fc_w", &[10, 8], noise(80, 2, 0.6)),
            tensor("fc_b", &[10], vec![0.0; 10]),
        ],
        input: vec![info("x")],
        output: vec![info("logits")],
        ..Default::default()
    };
    onnx::ModelProto { graph: Some(graph), ..Default::default() }
}

fn recipe(epochs: u32, learning_rate: f64) -> Recipe {
    Recipe { epochs, learning_rate, momentum: 0.9, weight_decay: 1e-4, batch_size: 64, seed: 3, augment: Vec::new() }
}

#[test]
fn a_small_model_learns_on_real_data() {
    let data = examples(Split::Train, 3000);
    let mut network = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
    let checkpoint = tempfile::tempdir().unwrap();
    let outcome =
        fit::fit(&mut network, &data, &recipe(3, 0.1), checkpoint.path(), None, &AtomicBool::new(false), |_| {})
            .unwrap();
    let losses = &outcome.epoch_losses;
    assert!(losses[2] < losses[0] && losses[0] < (10f32).ln(), "{losses:?}");
    let (accuracy, _) = fit::accuracy(&mut network, &examples(Split::Test, 2000), 500).unwrap();
    assert!(accuracy > 0.4, "a trained model beats chance (10%) by far: {accuracy}");
}

/// Every parameter of a resumed training is within 1e-3 of the uninterrupted one's.
fn assert_same_parameters(uninterrupted: &Network, resumed: &Network) {
    for (a, b) in uninterrupted.parameters.iter().zip(&resumed.parameters) {
        let diff = (a.var.as_tensor() - b.var.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-3, "{} differs by {diff} after resuming", a.name);
    }
}

#[test]
fn a_killed_training_resumes_from_its_last_epoch() {
    let data = examples(Split::Train, 640);
    let dir = tempfile::tempdir().unwrap();
    let full = |checkpoint: &Path| {
        let mut network = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
        let outcome =
            fit::fit(&mut network, &data, &recipe(3, 0.05), checkpoint, None, &AtomicBool::new(false), |_| {}).unwrap();
        (network, outcome)
    };
    let (uninterrupted, _) = full(&dir.path().join("uninterrupted"));

    // Interrupted during epoch 2, after the epoch 1 checkpoint.
    let interrupted_dir = dir.path().join("interrupted");
    let mut network = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
    let cancel = AtomicBool::new(false);
    let stopped = fit::fit(&mut network, &data, &recipe(3, 0.05), &interrupted_dir, None, &cancel, |step| {
        if step.epoch == 2 && step.step == 3 {
            cancel.store(true, Ordering::Relaxed);
        }
    });
    assert!(matches!(stopped, Err(TrainError::Cancelled)));
    let (resumed, outcome) = full(&interrupted_dir);
    assert_eq!(outcome.resumed_epochs, 1);
    assert_eq!(outcome.epoch_losses.len(), 3);
    assert_same_parameters(&uninterrupted, &resumed);
}

/// McNemar's test: a gain of a few images among many disagreements is a
/// tie; a gain well beyond its noise is not.
#[test]
fn an_epoch_displaces_the_kept_one_only_by_more_than_noise() {
    // 1,000 images; 20 disagreements, 12 fixed and 8 broken: +4 is noise.
    let kept: Vec<bool> = (0..1000).map(|i| i >= 20).collect();
    let mut noisy = kept.clone();
    (0..12).for_each(|i| noisy[i] = true);
    (20..28).for_each(|i| noisy[i] = false);
    assert!(!fit::significantly_better(&noisy, &kept));
    // 20 fixed, 8 broken: P(X >= 20 | 28 coin flips) = 1.8%.
    let mut real = kept.clone();
    (0..20).for_each(|i| real[i] = true);
    (20..28).for_each(|i| real[i] = false);
    assert!(fit::significantly_better(&real, &kept));
    assert!(!fit::significantly_better(&kept, &real), "and the other way round it is worse");
    assert!(!fit::significantly_better(&kept, &kept), "the same predictions are a tie");
    // 3 fixed, none broken is 1 chance in 8 (the normal approximation
    // passed it); 5 and none is 1 in 32.
    let mut three = kept.clone();
    (0..3).for_each(|i| three[i] = true);
    assert!(!fit::significantly_better(&three, &kept));
    let mut five = kept.clone();
    (0..5).for_each(|i| five[i] = true);
    assert!(fit::significantly_better(&five, &kept));
}

/// With validation, a resumed training has the same curve and keeps the
/// same epoch's weights as one never interrupted: the checkpoint holds the
/// curve and the best epoch's weights.
#[test]
fn a_resumed_training_keeps_its_curve_and_best_epoch() {
    let data = examples(Split::Train, 640);
    let held = examples(Split::Test, 300);
    let validation = fit::Validation { examples: &held, select: qsweep::spec::QatSelect::Best };
    let dir = tempfile::tempdir().unwrap();
    let full = |checkpoint: &Path| {
        let mut network = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
        let outcome = fit::fit(
            &mut network,
            &data,
            &recipe(3, 0.05),
            checkpoint,
            Some(&validation),
            &AtomicBool::new(false),
            |_| {},
        )
        .unwrap();
        (network, outcome)
    };
    let (uninterrupted, first) = full(&dir.path().join("uninterrupted"));
    assert_eq!(first.curve.len(), 4, "the start and three epochs");
    let kept = first.kept_epoch.unwrap() as usize;
    assert!(first.curve[..kept].iter().all(|p| p.correct < first.curve[kept].correct), "{:?}", first.curve);

    let interrupted_dir = dir.path().join("interrupted");
    let mut network = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
    let cancel = AtomicBool::new(false);
    let stopped =
        fit::fit(&mut network, &data, &recipe(3, 0.05), &interrupted_dir, Some(&validation), &cancel, |step| {
            if step.epoch == 3 && step.step == 2 {
                cancel.store(true, Ordering::Relaxed);
            }
        });
    assert!(matches!(stopped, Err(TrainError::Cancelled)));
    let (resumed, second) = full(&interrupted_dir);
    assert_eq!(second.resumed_epochs, 2);
    assert_eq!(second.kept_epoch, first.kept_epoch);
    for (a, b) in first.curve.iter().zip(&second.curve) {
        assert_eq!((a.epoch, a.correct), (b.epoch, b.correct));
    }
    assert_same_parameters(&uninterrupted, &resumed);
}

#[test]
fn a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint() {
    let data = examples(Split::Train, 640);
    let dir = tempfile::tempdir().unwrap();
    let mut network = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
    let mut exploding = recipe(2, 0.05);
    fit::fit(&mut network, &data, &recipe(1, 0.05), dir.path(), None, &AtomicBool::new(false), |_| {}).unwrap();
    exploding.learning_rate = 1e30;
    exploding.epochs = 1;
    let error =
        fit::fit(&mut network, &data, &exploding, &dir.path().join("second"), None, &AtomicBool::new(false), |_| {})
            .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, TrainError::NotFinite { epoch: 1, .. }), "{text}");
    assert!(text.contains("the loss became NaN or infinite at epoch 1, step"), "{text}");
    assert!(text.contains("fix: lower the learning rate"), "{text}");
    assert!(dir.path().join("state.json").exists(), "the earlier good checkpoint stays");
}

/// With `select: best`, a training whose loss blows up returns the epoch
/// it kept, here the start, and says where it diverged; with `last` there
/// is nothing to return, and it fails as above.
#[test]
fn a_diverged_training_with_a_kept_epoch_returns_it() {
    let data = examples(Split::Train, 640);
    let held = examples(Split::Test, 300);
    let dir = tempfile::tempdir().unwrap();
    let start = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
    let mut network = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
    let best = fit::Validation { examples: &held, select: qsweep::spec::QatSelect::Best };
    let outcome =
        fit::fit(&mut network, &data, &recipe(2, 1e30), dir.path(), Some(&best), &AtomicBool::new(false), |_| {})
            .unwrap();
    assert_eq!(outcome.kept_epoch, Some(0));
    assert_eq!(outcome.diverged.map(|d| d.epoch), Some(1), "{:?}", outcome.diverged);
    assert_eq!(outcome.curve.len(), 1, "only the start was scored: {:?}", outcome.curve);
    assert_same_parameters(&start, &network);

    let last = fit::Validation { examples: &held, select: qsweep::spec::QatSelect::Last };
    let error = fit::fit(
        &mut network,
        &data,
        &recipe(2, 1e30),
        &dir.path().join("last"),
        Some(&last),
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(error, TrainError::NotFinite { epoch: 1, .. }), "{error}");
}

/// A kill between writing a checkpoint's tensors and its state leaves one
/// epoch's weights beside the previous epoch's state: the pair is refused
/// and training starts over, rather than resuming the weights as the
/// wrong epoch's.
#[test]
fn a_checkpoint_whose_tensors_and_state_disagree_starts_over() {
    let data = examples(Split::Train, 640);
    let dir = tempfile::tempdir().unwrap();
    let two_epochs = dir.path().join("two");
    let mut network = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
    fit::fit(&mut network, &data, &recipe(2, 0.05), &two_epochs, None, &AtomicBool::new(false), |_| {}).unwrap();
    // Epoch 2's tensors beside epoch 1's state, of the same recipe.
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(two_epochs.join("state.json")).unwrap()).unwrap();
    state["epochs_done"] = 1.into();
    state["epoch_losses"].as_array_mut().unwrap().truncate(1);
    std::fs::write(two_epochs.join("state.json"), state.to_string()).unwrap();

    let mut resumed = Network::from_model(&small_model(), BatchNorm::Batch, None).unwrap();
    let outcome =
        fit::fit(&mut resumed, &data, &recipe(2, 0.05), &two_epochs, None, &AtomicBool::new(false), |_| {}).unwrap();
    assert_eq!(outcome.resumed_epochs, 0, "the mismatched checkpoint is not resumed");
    assert_same_parameters(&network, &resumed);
}

#[test]
fn a_model_without_parameters_or_with_an_unknown_operator_is_refused() {
    let mut model = small_model();
    model.graph.as_mut().unwrap().initializer.clear();
    model.graph.as_mut().unwrap().node = vec![node("Relu", &["x"], "logits", vec![])];
    assert!(matches!(Network::from_model(&model, BatchNorm::Frozen, None), Err(TrainError::NothingToTrain)));
    model.graph.as_mut().unwrap().node = vec![node("Softsign", &["x"], "logits", vec![])];
    let error = Network::from_model(&model, BatchNorm::Frozen, None).err().unwrap().to_string();
    assert!(error.contains("node logits: operator Softsign is not supported"), "{error}");
}

/// The QAT stage's exported Q/DQ model, run by ONNX Runtime's int8
/// kernels, predicts what the interpreter's fake-quantized forward pass
/// predicts on at least 99.5% of the test images.
#[test]
fn a_qat_export_agrees_with_the_interpreter_in_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "qat.json",
        &quick_spec_json(
            r#""matrix": { "calibration": ["mse"], "residual_fusion": [true], "qat_epochs": [1] }, "qat": { "samples": 1280 }"#,
        ),
    );
    let results = dir.path().join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(results.join("plan.json")).unwrap()).unwrap();
    let qat = plan["tasks"].as_array().unwrap().iter().find(|t| t["stage"] == "qat").expect("a qat task");
    let key = qsweep::plan::TaskKey(qat["key"].as_str().unwrap().to_string());
    let exported = qsweep::store::ResultsDir::open(&results).artifact_dir(&key).join("qdq.onnx");

    let model = qsweep::onnx::Model::load(&exported).unwrap();
    let levels = qsweep::quant::qdq::weight_levels(qsweep::spec::Int8Format::OnnxruntimeCpu);
    let mut network = Network::from_model(&model.proto, BatchNorm::Frozen, Some(levels)).unwrap();
    let mut session = qsweep::engine::InferenceSession::open(&exported, 2, None).unwrap();
    let test = examples(Split::Test, 10_000);
    let (mut agree, batch) = (0, 500);
    for start in (0..test.len()).step_by(batch) {
        let indices: Vec<usize> = (start..(start + batch).min(test.len())).collect();
        let (images, _) = test.batch(&indices).unwrap();
        let ours = predictions(&network.forward(&images, false).unwrap()).unwrap();
        let array = ndarray::Array4::from_shape_vec(
            (indices.len(), 1, 28, 28),
            images.flatten_all().unwrap().to_vec1().unwrap(),
        )
        .unwrap();
        let logits = session.run(array.view()).unwrap();
        let theirs = logits.rows().into_iter().map(|row| {
            row.iter().enumerate().fold((0, f32::MIN), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
        });
        agree += ours.iter().zip(theirs).filter(|(a, b)| **a == *b).count();
    }
    let agreement = agree as f64 / test.len() as f64;
    eprintln!("export fidelity: top-1 agreement {:.2}% on {} test images", agreement * 100.0, test.len());
    assert!(agreement >= 0.995, "top-1 agreement {agreement}");
}

/// A spec may declare a model to train; training is then a cached stage
/// that every task reading the model depends on.
#[test]
fn a_sweep_trains_its_own_model_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = quick_spec_json(r#""matrix": { "calibration": ["max"], "residual_fusion": [true] }"#).replace(
        &format!("{:?}", reference_model().to_str().unwrap()),
        r#"{ "train": { "depth": 8, "width": 4, "epochs": 1, "samples": 1024, "batch_size": 64 } }"#,
    );
    let spec = write(dir.path(), "trained.json", &text);
    let results = dir.path().join("results");
    let first = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(results.join("plan.json")).unwrap()).unwrap();
    let tasks = plan["tasks"].as_array().unwrap();
    let train = tasks.iter().find(|t| t["stage"] == "train").expect("a train task");
    for stage in ["calibrate", "build"] {
        for task in tasks.iter().filter(|t| t["stage"] == stage) {
            let inputs = task["inputs"].as_array().unwrap();
            assert!(inputs.iter().any(|i| i["role"] == "fp32_model" && i["key"] == train["key"]), "{task}");
        }
    }
    let rows = csv_rows(&results);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| &r[4] == "ok"), "{rows:?}");
    let second = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert!(stderr(&second).contains("0 task(s) executed"), "{}", stderr(&second));

    let bad = text.replace(r#""depth": 8"#, r#""depth": 9"#);
    let bad_spec = write(dir.path(), "bad.json", &bad);
    let refused = qsweep(&["validate", bad_spec.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("$.model.train.depth") && stderr(&refused).contains("6n + 2"),
        "{}",
        stderr(&refused)
    );
}

/// `qsweep train` from a model that does not fit the dataset's images says
/// so before training, and bad numbers are refused.
#[test]
fn qsweep_train_refuses_what_cannot_train() {
    let dir = tempfile::tempdir().unwrap();
    let mut rgb = small_model();
    let graph = rgb.graph.as_mut().unwrap();
    graph.initializer[0] = tensor("w", &[8, 3, 3, 3], vec![0.1; 8 * 27]);
    let start = dir.path().join("rgb.onnx");
    std::fs::write(&start, prost::Message::encode_to_vec(&rgb)).unwrap();
    let out = dir.path().join("out.onnx");
    let (start, out) = (start.to_str().unwrap(), out.to_str().unwrap());
    let output = qsweep(&["train", "--from", start, "--out", out, "--epochs", "1", "--samples", "64"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("the model cannot take 1x28x28 images"), "{}", stderr(&output));
    assert!(!Path::new(out).exists(), "nothing is written");
    // The flags are the spec's `model.train` fields, with its bounds.
    let bad_flags = [
        ["--learning-rate", "0"],
        ["--learning-rate", "1e9"],
        ["--weight-decay", "0.5"],
        ["--epochs", "0"],
        ["--depth", "10"],
        ["--samples", "0"],
        ["--samples", "4294967295"],
    ];
    for bad in bad_flags {
        let output = qsweep(&["train", "--out", out, bad[0], bad[1]]);
        assert_eq!(output.status.code(), Some(2), "{bad:?}: {}", stderr(&output));
    }
}
