//! Sensitivity ranking and float fallback (`matrix.float_layers`) end to
//! end through the real binary: a planted fragile op ranks first, `k` ops
//! stay in float and the lint agrees, "auto" stops at the first step within
//! budget or returns its best step with a note, the validation subset holds
//! out the calibration and test images, and rankings are reused.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_onnx::onnx;
use common::*;
use prost::Message;
use qsweep::onnx::graph::GraphIndex;
use qsweep::plan::{Plan, StageKind};
use qsweep::quant::qdq;
use qsweep::spec::Int8Format;
use qsweep::stages::fallback::Search;
use qsweep::stages::sensitivity::Ranking;

// ---------------------------------------------------------------- helpers

/// `images` (f32, used as they are) and `labels` as an `.npz`.
fn write_npz(path: &Path, images: &ndarray::ArrayViewD<'_, f32>, labels: &[i64]) {
    let scratch = tempfile::tempdir().unwrap();
    let (images_npy, labels_npy) = (scratch.path().join("images.npy"), scratch.path().join("labels.npy"));
    qsweep::data::tensor_file::write_npy(&images_npy, images).unwrap();
    let labels = ndarray::Array1::from(labels.to_vec()).into_dyn();
    qsweep::data::tensor_file::write_npy(&labels_npy, &labels.view()).unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, file) in [("images.npy", &images_npy), ("labels.npy", &labels_npy)] {
        zip.start_file(name, stored).unwrap();
        zip.write_all(&std::fs::read(file).unwrap()).unwrap();
    }
    zip.finish().unwrap();
}

/// Fashion-MNIST images of `split` at `indices`, normalized as the
/// reference model was trained, with their labels, as an `.npz`.
fn fashion_npz(path: &Path, split: qsweep::data::Split, indices: &[usize]) {
    let idx =
        qsweep::data::load_split(Default::default(), Path::new("/usr/share/datasets/fashion-mnist"), split).unwrap();
    let preprocess = qsweep::spec::Preprocess { mean: vec![0.2860], std: vec![0.3530], ..Default::default() };
    let tensors = idx.preprocess(&preprocess, Some(indices));
    write_npz(path, &tensors.images.view().into_dyn(), &tensors.labels.to_vec());
}

/// The first 1000 test images as `eval.npz` in `dir`: evaluating and
/// scoring fallback steps on them rather than all 10,000 keeps each sweep
/// to seconds.
fn eval_npz(dir: &Path) -> PathBuf {
    let path = dir.join("eval.npz");
    fashion_npz(&path, qsweep::data::Split::Test, &(0..1000).collect::<Vec<_>>());
    path
}

/// A spec for the reference model at tiny settings, evaluated on
/// `eval.npz`, calibrated on 200 IDX training images; `rest` is spliced in
/// as more top-level fields (the matrix, sensitivity).
fn reference_spec(dir: &Path, name: &str, rest: &str) -> PathBuf {
    if !dir.join("eval.npz").exists() {
        eval_npz(dir);
    }
    let text = quick_spec_json(&format!(r#""calibration": {{ "samples": 200, "seed": 0 }}, {rest}"#))
        .replace(
            r#""data": { "preprocess": { "mean": [0.2860], "std": [0.3530] } }"#,
            r#""data": { "preprocess": { "mean": [0.2860], "std": [0.3530] }, "evaluation": { "tensors": "eval.npz" } }"#,
        )
        .replace(r#""warmup": 2"#, r#""warmup": 1"#)
        .replace(r#""iterations": 20"#, r#""iterations": 5"#);
    write(dir, name, &text)
}

/// Sensitivity at the tiny settings every sweep here uses, plus `extra`.
fn sensitivity(extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    format!(r#""sensitivity": {{ "samples": 128, "validation_samples": 300, "seed": 0{sep}{extra} }}"#)
}

fn run_ok(spec: &Path, results: &Path) -> String {
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    err
}

fn plan_of(results: &Path) -> Plan {
    qsweep::store::ResultsDir::open(results).load_plan().unwrap()
}

fn artifact(results: &Path, key: &qsweep::plan::TaskKey) -> PathBuf {
    results.join("artifacts").join(&key.0)
}

/// The tasks of `stage` in the chain of run `id`.
fn run_tasks<'p>(plan: &'p Plan, id: &str, stage: StageKind) -> Vec<&'p qsweep::plan::Task> {
    let run = plan.runs.iter().find(|r| r.run.id == id).unwrap_or_else(|| panic!("no run {id}"));
    let tasks: Vec<_> = run.tasks.iter().filter_map(|k| plan.tasks.iter().find(|t| &t.key == k)).collect();
    tasks.into_iter().filter(|t| t.stage == stage).collect()
}

fn one_task<'p>(plan: &'p Plan, id: &str, stage: StageKind) -> &'p qsweep::plan::Task {
    let tasks = run_tasks(plan, id, stage);
    assert_eq!(tasks.len(), 1, "run {id} has {} {stage:?} tasks", tasks.len());
    tasks[0]
}

/// The prepare-data task of `split` in run `id`'s chain.
fn prepared_split<'p>(plan: &'p Plan, id: &str, split: &str) -> &'p qsweep::plan::Task {
    let tasks = run_tasks(plan, id, StageKind::PrepareData);
    tasks.iter().find(|t| t.params["split"] == split).unwrap_or_else(|| panic!("run {id} prepares no {split} data"))
}

fn source_indices(results: &Path, task: &qsweep::plan::Task) -> Vec<usize> {
    let path = artifact(results, &task.key).join("source_indices.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// runs.csv as (header, rows); `cell(row, column)`.
struct Csv {
    header: csv::StringRecord,
    rows: Vec<csv::StringRecord>,
}

impl Csv {
    fn read(results: &Path) -> Self {
        let mut reader = csv::Reader::from_path(results.join("runs.csv")).unwrap();
        let header = reader.headers().unwrap().clone();
        Csv { header, rows: reader.records().map(Result::unwrap).collect() }
    }

    fn cell(&self, run: &str, column: &str) -> String {
        let at = self.header.iter().position(|h| h == column).unwrap_or_else(|| panic!("no column {column}"));
        let row = self.rows.iter().find(|r| &r[0] == run).unwrap_or_else(|| panic!("no row {run}"));
        row[at].to_string()
    }

    fn float_ops(&self, run: &str) -> BTreeSet<String> {
        self.cell(run, "float_ops").split(';').filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}

/// The weighted ops of a Q/DQ model whose weight is not read through a
/// DequantizeLinear: the ops left in float.
fn float_weighted_ops(model: &onnx::ModelProto) -> BTreeSet<String> {
    let graph = model.graph.as_ref().unwrap();
    let index = GraphIndex::new(graph);
    graph
        .node
        .iter()
        .filter(|n| matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul"))
        .filter(|n| index.producer(&n.input[1]).is_none_or(|p| p.op_type != "DequantizeLinear"))
        .map(|n| n.name.clone())
        .collect()
}

fn load_model(path: &Path) -> onnx::ModelProto {
    qsweep::onnx::Model::load(path).unwrap().proto
}

// ------------------------------------------------- 1. a planted fragile op

/// A model of 1x2 grey "images" x = (x0, x1) with three weighted ops,
/// A -> B -> C:
///
/// - A: t = Relu(Conv(x)), a 1x2 kernel to two channels, t0 = x0 / 2 and
///   t1 = Relu(300 (x1 - 0.9)): zero for 90% of inputs, a spike of up to
///   30 for the rest;
/// - B: v = Tanh(Conv(t)), v0 = tanh(t0 - 0.5), v1 = tanh(0.1 t1 - 1.5):
///   class 1 wins only when the spike is large (t1 > 10 (t0 + 1));
/// - C: the logits, 5 v (a Gemm after a Flatten).
///
/// x0 spans [0, 2] and x1 [0, 1], so a 90th-percentile calibration clips
/// x's pair above every x1 (at about 1.6) but t's at about 0.8, far below
/// the spikes that decide class 1. t is the input of B, so only B restored
/// to float brings the model back to fp32 (A in float still leaves t's
/// pair, which B reads), and B is neither first nor last in graph order.
///
/// (Entropy keeps t's full range here: on a histogram this sparse, Q
/// spreads each level evenly over its few non-empty bins and matches P
/// exactly at any range, so only clipping costs divergence.)
fn spike_model() -> Vec<u8> {
    use onnx::tensor_shape_proto::{dimension::Value as D, Dimension};
    let tensor = |name: &str, dims: &[i64], values: &[f32]| onnx::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: values.to_vec(),
        ..Default::default()
    };
    let node = |op: &str, name: &str, inputs: &[&str], output: &str| onnx::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let info = |name: &str, dims: &[i64]| onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(onnx::type_proto::Tensor {
                elem_type: 1,
                shape: Some(onnx::TensorShapeProto {
                    dim: std::iter::once(Dimension { value: Some(D::DimParam("N".into())), denotation: String::new() })
                        .chain(
                            dims.iter().map(|&v| Dimension { value: Some(D::DimValue(v)), denotation: String::new() }),
                        )
                        .collect(),
                }),
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    };
    let mut gemm = node("Gemm", "C", &["flat", "wc", "bc"], "logits");
    gemm.attribute.push(onnx::AttributeProto {
        name: "transB".into(),
        r#type: onnx::attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    });
    let mut flatten = node("Flatten", "flatten", &["v"], "flat");
    flatten.attribute.push(onnx::AttributeProto {
        name: "axis".into(),
        r#type: onnx::attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    });
    onnx::ModelProto {
        ir_version: 8,
        opset_import: vec![onnx::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(onnx::GraphProto {
            name: "spike".into(),
            node: vec![
                node("Conv", "A", &["x", "wa", "ba"], "a"),
                node("Relu", "relu", &["a"], "t"),
                node("Conv", "B", &["t", "wb", "bb"], "u"),
                node("Tanh", "tanh", &["u"], "v"),
                flatten,
                gemm,
            ],
            initializer: vec![
                tensor("wa", &[2, 1, 1, 2], &[0.5, 0.0, 0.0, 300.0]),
                tensor("ba", &[2], &[0.0, -270.0]),
                tensor("wb", &[2, 2, 1, 1], &[1.0, 0.0, 0.0, 0.1]),
                tensor("bb", &[2], &[-0.5, -1.5]),
                tensor("wc", &[2, 2], &[5.0, 0.0, 0.0, 5.0]),
                tensor("bc", &[2], &[0.0, 0.0]),
            ],
            input: vec![info("x", &[1, 1, 2])],
            output: vec![info("logits", &[2])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `count` inputs of the spike model from a seeded generator, and the
/// class fp32 gives each (computed from the model's formula).
fn spike_data(count: usize, seed: u64) -> (ndarray::Array4<f32>, Vec<i64>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut images = ndarray::Array4::<f32>::zeros((count, 1, 1, 2));
    let mut labels = Vec::with_capacity(count);
    for i in 0..count {
        let x0: f32 = rng.random_range(0.0..2.0);
        let x1: f32 = if rng.random_bool(0.1) { rng.random_range(0.9..1.0) } else { rng.random_range(0.0..0.9) };
        images[[i, 0, 0, 0]] = x0;
        images[[i, 0, 0, 1]] = x1;
        let t1 = (300.0 * (x1 - 0.9)).max(0.0);
        labels.push(i64::from((0.1 * t1 - 1.5f32).tanh() > (0.5 * x0 - 0.5).tanh()));
    }
    (images, labels)
}

#[test]
fn the_op_reading_a_clipped_spike_ranks_first() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spike.onnx"), spike_model()).unwrap();
    let (train, train_labels) = spike_data(1000, 1);
    write_npz(&dir.path().join("train.npz"), &train.view().into_dyn(), &train_labels);
    let (test, test_labels) = spike_data(500, 2);
    write_npz(&dir.path().join("test.npz"), &test.view().into_dyn(), &test_labels);
    assert!(train_labels.iter().filter(|&&l| l == 1).count() > 20, "the data plants too few decisive spikes");
    let spec = write(
        dir.path(),
        "spike.json",
        r#"{
  "name": "spike",
  "model": "spike.onnx",
  "data": { "calibration": { "tensors": "train.npz" }, "evaluation": { "tensors": "test.npz" } },
  "calibration": { "samples": 200, "seed": 0, "percentile": 90 },
  "matrix": { "calibration": ["percentile"], "float_layers": [1] },
  "sensitivity": { "samples": 256, "validation_samples": 300 },
  "evaluate": { "batch_sizes": [1, 64], "warmup": 1, "iterations": 5, "threads": 1 }
}"#,
    );
    let results = dir.path().join("results");
    run_ok(&spec, &results);

    let plan = plan_of(&results);
    let sensitivity: Vec<_> = plan.tasks.iter().filter(|t| t.stage == StageKind::Sensitivity).collect();
    assert_eq!(sensitivity.len(), 1);
    let ranking = Ranking::read(&artifact(&results, &sensitivity[0].key)).unwrap();
    let names: Vec<&str> = ranking.ops.iter().map(|o| o.op.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(names[0], "B", "B reads the clipped spike and must rank first: {:#?}", ranking.ops);
    // Clearly so: quantizing everything costs real divergence, B alone in
    // float removes nearly all of it, and A or C alone removes little.
    let kl = |name: &str| ranking.ops.iter().find(|o| o.op.name == name).unwrap().restored.kl;
    assert!(ranking.quantized.kl > 0.01 && ranking.quantized.agreement < 0.99, "{:?}", ranking.quantized);
    assert!(kl("B") < 0.1 * kl("A").min(kl("C")), "KL with B, A, C in float: {} {} {}", kl("B"), kl("A"), kl("C"));
    assert!(kl("B") < 0.1 * ranking.quantized.kl);
    let b = &ranking.ops[0];
    assert!(b.restored.agreement > ranking.quantized.agreement, "{:?}", ranking.ops);
    assert_eq!(b.float_ops, ["B"], "t's pair is read by B alone");
    // Each op in the ranking after the first is no more helpful than it.
    assert!(ranking.ops.windows(2).all(|w| w[0].restored.kl <= w[1].restored.kl), "{:#?}", ranking.ops);

    // float_layers 1 leaves B, and only B, without Q/DQ, and it shows.
    let csv = Csv::read(&results);
    assert_eq!(csv.float_ops("percentile-unfused-ptq-float1"), BTreeSet::from(["B".to_string()]));
    let build = one_task(&plan, "percentile-unfused-ptq-float1", StageKind::Build);
    let model = load_model(&artifact(&results, &build.key).join("qdq.onnx"));
    assert_eq!(float_weighted_ops(&model), BTreeSet::from(["B".to_string()]));
    let top1: f64 = csv.cell("percentile-unfused-ptq-float1", "accuracy").parse().unwrap();
    assert!(top1 >= 99.0, "with B in float the model is fp32's again: {top1}%");
}

// ---------------------------------------- 2, 3, 5, 6: the reference model

/// k ops in float, "auto", the held-out split and reuse, on one sweep of
/// entropy, unfused, in the onnxruntime-cpu format (whose two most
/// sensitive ops are closures of one op each).
#[test]
fn float_layers_on_the_reference_model() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let matrix = r#""matrix": { "calibration": ["entropy"], "residual_fusion": [false], "float_layers": [1, "auto"] }"#;
    let spec =
        reference_spec(dir.path(), "spec.json", &format!("{matrix}, {}", sensitivity(r#""accuracy_budget": 0.3"#)));
    let first = run_ok(&spec, &results);
    assert!(first.contains("task(s) executed, 0 reused"), "{first}");
    let plan = plan_of(&results);
    let csv = Csv::read(&results);
    let ranked = one_task(&plan, "entropy-unfused-ptq-float1", StageKind::Sensitivity);
    let ranking = Ranking::read(&artifact(&results, &ranked.key)).unwrap();
    assert!(ranking.ops.len() >= 4 && ranking.ops[0].float_ops.len() == 1, "{:#?}", ranking.ops);

    // 2. float_layers 1: exactly the top op lacks Q/DQ, as runs.csv says.
    let k_ops = |k: usize| -> BTreeSet<String> { ranking.ops[..k].iter().map(|o| o.op.name.clone()).collect() };
    check_float_count(&results, &plan, &csv, "entropy-unfused-ptq-float1", &k_ops(1));

    // 3. "auto" stops at the first step within budget.
    let searched = one_task(&plan, "entropy-unfused-ptq-auto", StageKind::Fallback);
    let search = Search::read(&artifact(&results, &searched.key)).unwrap();
    assert!(search.budget_met && search.note.is_none(), "{search:#?}");
    assert!(search.steps.len() >= 2, "entropy alone misses 0.3 points on the reference model: {search:#?}");
    let (last, earlier) = search.steps.split_last().unwrap();
    let short = |s: &qsweep::stages::fallback::Step| search.fp32_validation_top1 - s.validation_top1;
    assert!(last.within_budget && short(last) <= search.accuracy_budget + 1e-9, "{last:?}");
    for step in earlier {
        assert!(
            !step.within_budget && short(step) > search.accuracy_budget,
            "{step:?} is within budget, yet the search went on"
        );
    }
    assert_eq!(search.chosen, search.steps.len() - 1);
    assert!(search.steps[0].float_ops.is_empty(), "the search starts from everything quantized");
    for (k, pair) in search.steps.windows(2).enumerate() {
        let (a, b): (BTreeSet<_>, BTreeSet<_>) =
            (pair[0].float_ops.iter().collect(), pair[1].float_ops.iter().collect());
        assert!(a.is_subset(&b) && b.len() > a.len(), "step {} does not add to step {k}", k + 1);
    }
    for (k, step) in search.steps.iter().enumerate() {
        assert_eq!(step.model, format!("step-{k}.onnx"));
        assert!(artifact(&results, &searched.key).join(&step.model).is_file());
    }
    let chosen: BTreeSet<String> = last.float_ops.iter().cloned().collect();
    assert_eq!(csv.float_ops("entropy-unfused-ptq-auto"), chosen);
    assert_eq!(csv.cell("entropy-unfused-ptq-auto", "budget_met"), "true");
    let validation_top1: f64 = csv.cell("entropy-unfused-ptq-auto", "validation_accuracy").parse().unwrap();
    assert!((validation_top1 - last.validation_top1).abs() < 1e-9);
    check_float_count(&results, &plan, &csv, "entropy-unfused-ptq-auto", &chosen);
    // Fallback pays: the auto run is far closer to fp32 than float1's top op alone was.
    let accuracy = |run: &str| csv.cell(run, "accuracy").parse::<f64>().unwrap();
    assert!(accuracy("entropy-unfused-ptq-auto") > accuracy("fp32") - 1.0, "{:?}", csv.rows);

    // 5. The validation subset: from the training split (as calibration),
    // none of the calibration images, and not the evaluation source.
    let validation = prepared_split(&plan, "entropy-unfused-ptq-auto", "validation");
    let calibration = prepared_split(&plan, "entropy-unfused-ptq-auto", "calibration");
    let evaluation = prepared_split(&plan, "entropy-unfused-ptq-auto", "test");
    for task in [validation, calibration] {
        assert_eq!(task.params["source"]["kind"], "idx", "{}", task.params);
        assert_eq!(task.params["source"]["split"], "train", "{}", task.params);
    }
    assert_eq!(evaluation.params["source"]["kind"], "tensors");
    let (v, c) = (source_indices(&results, validation), source_indices(&results, calibration));
    assert_eq!((v.len(), c.len()), (300, 200));
    assert_eq!(v.iter().collect::<HashSet<_>>().len(), 300, "drawn without repeats");
    let c: HashSet<usize> = c.into_iter().collect();
    let shared: Vec<&usize> = v.iter().filter(|i| c.contains(i)).collect();
    assert!(shared.is_empty(), "validation holds calibration images {shared:?}");
    assert!(v.iter().all(|&i| i < 60_000));
    // The held-out draw is what fallback and sensitivity read.
    assert_eq!(ranked.input("data"), Some(&validation.key));
    assert_eq!(searched.input("data"), Some(&validation.key));

    // 6. A second run with another float_layers value reuses the ranking
    // (same key, same sealed artifact) and the search: only the new
    // run's build and evaluate execute.
    let ranking_manifest = std::fs::read(artifact(&results, &ranked.key).join("manifest.json")).unwrap();
    let search_manifest = std::fs::read(artifact(&results, &searched.key).join("manifest.json")).unwrap();
    let spec = reference_spec(
        dir.path(),
        "spec.json",
        &format!(
            "{}, {}",
            matrix.replace(r#"[1, "auto"]"#, r#"[1, 2, "auto"]"#),
            sensitivity(r#""accuracy_budget": 0.3"#)
        ),
    );
    let second = run_ok(&spec, &results);
    assert!(second.contains("2 task(s) executed,"), "only float2's build and evaluate should run: {second}");
    assert!(!second.contains("start sensitivity") && !second.contains("start fallback"), "{second}");
    let plan = plan_of(&results);
    assert_eq!(one_task(&plan, "entropy-unfused-ptq-float2", StageKind::Sensitivity).key, ranked.key);
    assert_eq!(std::fs::read(artifact(&results, &ranked.key).join("manifest.json")).unwrap(), ranking_manifest);
    assert_eq!(std::fs::read(artifact(&results, &searched.key).join("manifest.json")).unwrap(), search_manifest);

    // 2 again, for k = 2.
    let csv = Csv::read(&results);
    check_float_count(&results, &plan, &csv, "entropy-unfused-ptq-float2", &k_ops(2));
}

/// The built `qdq.onnx` of run `id` leaves exactly `expected` weighted ops
/// without a dequantized weight, runs.csv and the build's metrics say the
/// same, and the lint passes with them in float.
fn check_float_count(results: &Path, plan: &Plan, csv: &Csv, id: &str, expected: &BTreeSet<String>) {
    let build = one_task(plan, id, StageKind::Build);
    let model = load_model(&artifact(results, &build.key).join("qdq.onnx"));
    assert_eq!(&float_weighted_ops(&model), expected, "{id}");
    assert_eq!(&csv.float_ops(id), expected, "{id}");
    qdq::lint(&model, false, expected).unwrap_or_else(|e| panic!("{id}: {e}"));
    // Every other weighted op still reads a quantized activation.
    let graph = model.graph.as_ref().unwrap();
    let index = GraphIndex::new(graph);
    for node in graph.node.iter().filter(|n| matches!(n.op_type.as_str(), "Conv" | "Gemm")) {
        let dequantized = index.producer(&node.input[0]).is_some_and(|p| p.op_type == "DequantizeLinear");
        assert_eq!(dequantized, !expected.contains(&node.name), "{id}: {}", node.name);
    }
}

/// With residual fusion, a residual Add left in float has a float
/// shortcut on purpose: the lint accepts it only when told so, and names
/// it otherwise.
#[test]
fn the_lint_knows_a_float_residual_add_from_a_fusion_mistake() {
    let model = load_model(&reference_model());
    let graph = model.graph.as_ref().unwrap();
    let ranges = qdq::calibration_tensors(graph)
        .into_iter()
        .map(|t| (t, qdq::Range { amax: 4.0, nonnegative: false }))
        .collect();
    for format in [Int8Format::Tensorrt, Int8Format::OnnxruntimeCpu] {
        let ops = qdq::quantized_ops(graph, format, true);
        let add = ops.iter().find(|o| o.op_type == "Add").expect("fusion quantizes residual Adds").name.clone();
        let fallback = qdq::Fallback { ops: BTreeSet::from([add.clone()]), ..Default::default() };
        let (quantized, summary) = qdq::quantize_except(&model, &ranges, format, true, &fallback).unwrap();
        let float: BTreeSet<String> = summary.float_ops.iter().cloned().collect();
        assert!(float.contains(&add), "{format:?}: {float:?}");
        assert_eq!(summary.float_adds, std::slice::from_ref(&add), "{format:?}: only that Add's shortcut is float");
        qdq::lint(&quantized, true, &float).unwrap();
        match qdq::lint(&quantized, true, &BTreeSet::new()) {
            Err(qdq::QdqError::Lint { node, problem }) => {
                assert_eq!(node, add);
                assert!(problem.contains("shortcut input of this Add is not quantized"), "{problem}");
            }
            other => panic!("{format:?}: a float shortcut not declared float passed the lint: {other:?}"),
        }
    }
}

// ------------------------------------------------- 4. a budget never met

/// Budget 0 with at most one op in float: entropy on the reference model
/// needs two, so the search misses, says so, and still returns its best
/// step, and the run is ok.
#[test]
fn a_missed_budget_returns_the_best_step_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let results = missed_budget_sweep(dir.path());
    let plan = plan_of(&results);
    let searched = one_task(&plan, "entropy-unfused-ptq-auto", StageKind::Fallback);
    let search = Search::read(&artifact(&results, &searched.key)).unwrap();
    assert!(!search.budget_met, "{search:#?}");
    assert_eq!(search.max_float_layers, 1);
    assert_eq!(search.steps.len(), 2, "none in float, then one: {search:#?}");
    assert!(search.steps.iter().all(|s| !s.within_budget && s.float_ops.len() <= 1));
    let best = search.steps.iter().map(|s| s.validation_top1).fold(f64::MIN, f64::max);
    let first_best = search.steps.iter().position(|s| s.validation_top1 == best).unwrap();
    assert_eq!(search.chosen, first_best, "{search:#?}");
    let note = search.note.as_deref().expect("a missed budget has a note");
    assert!(note.contains("not met") && note.contains("best step"), "{note}");
    assert!(note.contains("up to 1 ops in float"), "{note}");

    let manifest = qsweep::store::ResultsDir::open(&results).manifest(&searched.key).unwrap();
    assert_eq!(manifest.metrics["budget_met"], false);
    assert_eq!(manifest.metrics["note"].as_str(), Some(note));
    let csv = Csv::read(&results);
    assert_eq!(csv.cell("entropy-unfused-ptq-auto", "status"), "ok");
    assert_eq!(csv.cell("entropy-unfused-ptq-auto", "budget_met"), "false");
    let chosen: BTreeSet<String> = search.chosen_step().float_ops.iter().cloned().collect();
    assert_eq!(csv.float_ops("entropy-unfused-ptq-auto"), chosen);
}

/// Runs the missed-budget sweep in `dir` (exit 0); returns its results.
fn missed_budget_sweep(dir: &Path) -> PathBuf {
    let results = dir.join("results");
    let spec = reference_spec(
        dir,
        "spec.json",
        &format!(
            r#""matrix": {{ "calibration": ["entropy"], "float_layers": ["auto"] }}, {}"#,
            sensitivity(r#""accuracy_budget": 0, "max_float_layers": 1"#)
        ),
    );
    run_ok(&spec, &results);
    results
}

/// summary.md is where a reader looks: a run that missed its budget must
/// say so there too, not only in runs.csv and the fallback artifact.
#[test]
fn a_missed_budget_is_said_in_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let results = missed_budget_sweep(dir.path());
    let summary = std::fs::read_to_string(results.join("summary.md")).unwrap();
    let line = summary.lines().find(|l| l.starts_with("| entropy-unfused-ptq-auto |")).unwrap();
    assert!(line.contains("budget") && line.contains("not met"), "{line}");
}

// ----------------------------------------------- 5. held-out, other sources

/// Calibration from a tensor file of training images, evaluation from
/// another of test images: the validation subset is drawn from the
/// calibration file, none of its calibration rows, and none of the
/// evaluation file's images.
#[test]
fn the_validation_subset_of_a_tensor_source_holds_out_calibration_and_test() {
    let dir = tempfile::tempdir().unwrap();
    fashion_npz(&dir.path().join("train.npz"), qsweep::data::Split::Train, &(0..600).collect::<Vec<_>>());
    let spec_text = std::fs::read_to_string(reference_spec(
        dir.path(),
        "base.json",
        &format!(r#""matrix": {{ "calibration": ["max"], "float_layers": [1] }}, {}"#, sensitivity("")),
    ))
    .unwrap();
    let spec_text =
        spec_text.replace(r#""evaluation": {"#, r#""calibration": { "tensors": "train.npz" }, "evaluation": {"#);
    let spec = write(dir.path(), "spec.json", &spec_text);
    let results = dir.path().join("results");
    run_ok(&spec, &results);
    let plan = plan_of(&results);
    let validation = prepared_split(&plan, "max-unfused-ptq-float1", "validation");
    let calibration = prepared_split(&plan, "max-unfused-ptq-float1", "calibration");
    for task in [validation, calibration] {
        assert!(task.params["source"]["path"].as_str().unwrap().ends_with("train.npz"), "{}", task.params);
    }
    let (v, c) = (source_indices(&results, validation), source_indices(&results, calibration));
    assert_eq!((v.len(), c.len()), (300, 200));
    assert!(v.iter().all(|i| *i < 600 && !c.contains(i)), "validation {v:?} meets calibration {c:?}");
    // No validation image is an evaluation image, pixel for pixel.
    let evaluation = prepared_split(&plan, "max-unfused-ptq-float1", "test");
    let (validation_images, _) = prepared_images(&results, &validation.key.0);
    let (evaluation_images, _) = prepared_images(&results, &evaluation.key.0);
    let rows = |a: &ndarray::ArrayD<f32>| -> HashSet<Vec<u32>> {
        a.outer_iter().map(|r| r.iter().map(|v| v.to_bits()).collect()).collect()
    };
    assert_eq!(rows(&validation_images).intersection(&rows(&evaluation_images)).count(), 0);
}

/// A float_layers 1 sweep on the reference model, as text to edit.
fn float1_spec_text(dir: &Path) -> String {
    let rest = format!(r#""matrix": {{ "calibration": ["max"], "float_layers": [1] }}, {}"#, sensitivity(""));
    std::fs::read_to_string(reference_spec(dir, "base.json", &rest)).unwrap()
}

/// Calibrating from the evaluation source would judge the budget on test
/// images: refused, naming data.calibration, with nothing written.
#[test]
fn calibration_from_the_evaluation_source_is_refused_with_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let base = float1_spec_text(dir.path());
    let same = base.replace(r#""evaluation": {"#, r#""calibration": { "tensors": "eval.npz" }, "evaluation": {"#);
    let err = refused_spec(dir.path(), &same);
    assert!(err.contains("$.data.calibration") && err.contains("also the evaluation source"), "{err}");
    // Without float_layers or a sensitivity section there is no validation
    // subset, and calibrating on the evaluation file is the user's call.
    let plain = same.replace(r#", "float_layers": [1]"#, "");
    let plain = plain.replace(&format!(", {}", sensitivity("")), "");
    let spec = write(dir.path(), "plain.json", &plain);
    let output = qsweep(&["validate", spec.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

/// The same file with a calibration subset of its own is still the
/// evaluation source.
#[test]
fn calibration_from_a_subset_of_the_evaluation_source_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let base = float1_spec_text(dir.path());
    let same = base
        .replace(r#""evaluation": {"#, r#""calibration": { "tensors": "eval.npz", "samples": 200 }, "evaluation": {"#);
    let err = refused_spec(dir.path(), &same);
    assert!(err.contains("$.data.calibration") && err.contains("also the evaluation source"), "{err}");
}

/// `qsweep run` exits 2 and writes nothing; `validate` agrees. Returns stderr.
fn refused_spec(dir: &Path, text: &str) -> String {
    let spec = write(dir, "refused.json", text);
    let results = dir.join("refused-results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(!results.exists(), "nothing may be written for a refused spec");
    let validated = qsweep(&["validate", spec.to_str().unwrap()]);
    assert_eq!(validated.status.code(), Some(2));
    err
}

// ------------------------------------------------------ 6. shared rankings

/// One ranking per PTQ ancestry (method, fusion): every float_layers value
/// and every QAT epoch count of a recipe reads the same sensitivity task,
/// and QAT trains with the same ops in float as its PTQ sibling's build.
#[test]
fn one_ranking_serves_every_run_of_a_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let spec = reference_spec(
        dir.path(),
        "spec.json",
        &format!(
            r#""matrix": {{ "calibration": ["entropy", "max"], "residual_fusion": [false, true], "float_layers": [1, 2, "auto"], "qat_epochs": [0, 1] }},
  "qat": {{ "samples": 500 }}, {}"#,
            sensitivity(r#""accuracy_budget": 0.3"#)
        ),
    );
    let output = qsweep(&["plan", spec.to_str().unwrap(), "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let tasks = plan["tasks"].as_array().unwrap();
    let of_stage = |stage: &str| tasks.iter().filter(|t| t["stage"] == stage).collect::<Vec<_>>();
    // 2 methods x 2 fusions x 3 float_layers x 2 qat_epochs, and fp32.
    assert_eq!(plan["runs"].as_array().unwrap().len(), 25);
    let ranked = of_stage("sensitivity");
    assert_eq!(ranked.len(), 4, "one ranking per (method, fusion)");
    assert!(ranked.iter().all(|t| t["runs"] == 6), "each serves its recipe's six runs");
    let searched = of_stage("fallback");
    assert_eq!(searched.len(), 4, "one search per (method, fusion), shared by PTQ and QAT");
    assert!(searched.iter().all(|t| t["runs"] == 2));
    let validation: Vec<_> =
        of_stage("prepare-data").into_iter().filter(|t| t["params"]["split"] == "validation").collect();
    assert_eq!(validation.len(), 1, "one validation subset for the sweep");
    assert_eq!(validation[0]["runs"], 24);
    let task = |key: &serde_json::Value| tasks.iter().find(|t| &t["key"] == key).unwrap();
    let input = |t: &serde_json::Value, role: &str| {
        t["inputs"].as_array().unwrap().iter().find(|i| i["role"] == role).map(|i| i["key"].clone())
    };
    for method in ["entropy", "max"] {
        for fusion in ["unfused", "fused"] {
            let mut keys = BTreeSet::new();
            for float in ["float1", "float2", "auto"] {
                for training in ["ptq", "qat1"] {
                    let id = format!("{method}-{fusion}-{training}-{float}");
                    let run = plan["runs"].as_array().unwrap().iter().find(|r| r["id"] == id.as_str()).unwrap();
                    let chain: Vec<&serde_json::Value> = run["tasks"].as_array().unwrap().iter().map(task).collect();
                    let sensitivity: Vec<_> = chain.iter().filter(|t| t["stage"] == "sensitivity").collect();
                    assert_eq!(sensitivity.len(), 1, "{id}");
                    keys.insert(sensitivity[0]["key"].to_string());
                    if training == "qat1" {
                        let qat = chain.iter().find(|t| t["stage"] == "qat").unwrap();
                        let reads = if float == "auto" { "fallback" } else { "sensitivity" };
                        assert!(input(qat, reads).is_some(), "{id}: QAT trains with the ops in float");
                        assert_eq!(
                            qat["params"]["float_layers"],
                            if float == "auto" {
                                serde_json::json!("auto")
                            } else {
                                serde_json::json!(float[5..].parse::<u32>().unwrap())
                            }
                        );
                    }
                }
            }
            assert_eq!(keys.len(), 1, "{method}-{fusion}: {keys:?}");
        }
    }
}

/// The axis composes with QAT: the partially quantized PTQ model is what
/// QAT fine-tunes, its float op stays float through training, and the
/// trained model is what the run builds.
#[test]
fn qat_fine_tunes_a_partially_quantized_model() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let rest = format!(
        r#""matrix": {{ "calibration": ["entropy"], "residual_fusion": [false], "float_layers": [2], "qat_epochs": [1] }},
           "qat": {{ "samples": 500, "batch_size": 64, "learning_rate": 0.0001, "validation_samples": 200 }}, {}"#,
        sensitivity("")
    );
    run_ok(&reference_spec(dir.path(), "spec.json", &rest), &results);
    let plan = plan_of(&results);
    let csv = Csv::read(&results);
    let id = "entropy-unfused-qat1-float2";
    let ranked = one_task(&plan, id, StageKind::Sensitivity);
    let ranking = Ranking::read(&artifact(&results, &ranked.key)).unwrap();
    let expected = ranking.most_sensitive(2);
    assert_eq!(expected.len(), 2, "{:#?}", ranking.ops);

    let qat = one_task(&plan, id, StageKind::Qat);
    assert_eq!(qat.input("sensitivity"), Some(&ranked.key), "QAT starts from the partial model");
    let trained = load_model(&artifact(&results, &qat.key).join("qdq.onnx"));
    assert_eq!(float_weighted_ops(&trained), expected, "the float ops stay float through QAT");
    check_float_count(&results, &plan, &csv, id, &expected);
    // Two float convs recover entropy's loss; a QAT epoch on top keeps it.
    let accuracy = |run: &str| csv.cell(run, "accuracy").parse::<f64>().unwrap();
    assert!(accuracy(id) > accuracy("fp32") - 1.0, "{:?}", csv.rows);
}

/// `fallback_precision: fp16` in the tensorrt format: each float op runs
/// in half precision between Casts (its weight stored as fp16, its input
/// cast to fp16 and its output back to fp32), every other op keeps its
/// Q/DQ, and ONNX Runtime builds and scores the model as well as fp32's
/// float ops would.
#[test]
fn fp16_fallback_casts_around_each_float_op() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let rest = format!(
        r#""int8_format": "tensorrt",
           "matrix": {{ "calibration": ["entropy"], "residual_fusion": [false], "float_layers": [2] }}, {}"#,
        sensitivity(r#""fallback_precision": "fp16""#)
    );
    run_ok(&reference_spec(dir.path(), "spec.json", &rest), &results);
    let plan = plan_of(&results);
    let csv = Csv::read(&results);
    let id = "entropy-unfused-ptq-float2";
    let build = one_task(&plan, id, StageKind::Build);
    let model = load_model(&artifact(&results, &build.key).join("qdq.onnx"));
    let graph = model.graph.as_ref().unwrap();
    let index = GraphIndex::new(graph);
    let float = csv.float_ops(id);
    assert_eq!(float.len(), 2);
    let cast_to = |node: &onnx::NodeProto| node.attribute.iter().find(|a| a.name == "to").map(|a| a.i);
    const FLOAT: i64 = 1;
    const FLOAT16: i64 = 10;
    for node in graph.node.iter().filter(|n| float.contains(&n.name)) {
        let input = index.producer(&node.input[0]).unwrap_or_else(|| panic!("{} reads a graph input", node.name));
        assert_eq!((input.op_type.as_str(), cast_to(input)), ("Cast", Some(FLOAT16)), "{}", node.name);
        let weight = graph.initializer.iter().find(|t| t.name == node.input[1]).expect("a constant weight");
        assert_eq!(weight.data_type, FLOAT16 as i32, "{}'s weight", node.name);
        let consumers = index.consumers(&node.output[0]);
        assert!(!consumers.is_empty());
        for (consumer, _) in consumers {
            let consumer = &graph.node[consumer];
            assert_eq!((consumer.op_type.as_str(), cast_to(consumer)), ("Cast", Some(FLOAT)), "{}", node.name);
        }
    }
    let quantized = graph.node.iter().filter(|n| n.op_type == "Conv" && !float.contains(&n.name));
    for node in quantized {
        let input = index.producer(&node.input[0]).map(|p| p.op_type.as_str());
        assert_eq!(input, Some("DequantizeLinear"), "{} keeps its int8 input", node.name);
    }
    let accuracy = |run: &str| csv.cell(run, "accuracy").parse::<f64>().unwrap();
    assert!(accuracy(id) > accuracy("fp32") - 1.0, "{:?}", csv.rows);
}
