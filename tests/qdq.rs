//! The Q/DQ rewrite on real exported graphs: residual fusion puts a
//! quantized shortcut on every residual Add and none without it, the result
//! loads and runs in ONNX Runtime, and the lint stops models TensorRT would
//! reject, naming the node.

use std::collections::HashMap;
use std::path::Path;

use candle_onnx::onnx::ModelProto;
use prost::Message;
use qsweep::engine::InferenceSession;
use qsweep::onnx::graph::{residual_adds, GraphIndex};
use qsweep::onnx::Model;
use qsweep::quant::qdq::{self, QdqError, Range};
use qsweep::spec::Int8Format;

const MODELS: [&str; 5] = [
    "experiments/models/fashion-resnet8.onnx",
    "tests/fixtures/graphs/bn_kept_flatten.onnx",
    "tests/fixtures/graphs/bn_folded_flatten.onnx",
    "tests/fixtures/graphs/bn_folded_reshape.onnx",
    // One zero bias shared by five convs (PyTorch's export of an untrained
    // model), and two outputs.
    "tests/fixtures/graphs/shared_biases_two_outputs.onnx",
];
const FORMATS: [Int8Format; 2] = [Int8Format::Tensorrt, Int8Format::OnnxruntimeCpu];

fn load(relative: &str) -> ModelProto {
    Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)).unwrap().proto
}

/// Plausible ranges for every tensor calibration would measure.
fn ranges(model: &ModelProto) -> HashMap<String, Range> {
    qdq::calibration_tensors(model.graph.as_ref().unwrap())
        .into_iter()
        .map(|t| (t, Range { amax: 4.0, nonnegative: false }))
        .collect()
}

/// For each residual Add: is each input read through a DequantizeLinear?
fn add_inputs_dequantized(model: &ModelProto) -> Vec<(usize, [bool; 2])> {
    let graph = model.graph.as_ref().unwrap();
    let index = GraphIndex::new(graph);
    residual_adds(&index)
        .into_iter()
        .map(|add| {
            let node = &graph.node[add.node];
            let dq = |slot: usize| index.producer(&node.input[slot]).is_some_and(|p| p.op_type == "DequantizeLinear");
            (add.skip_slot, [dq(0), dq(1)])
        })
        .collect()
}

#[test]
fn fusion_quantizes_every_shortcut_and_only_with_fusion() {
    for file in MODELS {
        let model = load(file);
        for format in FORMATS {
            let (fused, summary) = qdq::quantize(&model, &ranges(&model), format, true).unwrap();
            let adds = add_inputs_dequantized(&fused);
            assert!(!adds.is_empty(), "{file}");
            assert!(adds.iter().all(|(skip, dq)| dq[*skip]), "{file} {format:?}: {adds:?}");
            assert!(summary.float_adds.is_empty());

            let (unfused, summary) = qdq::quantize(&model, &ranges(&model), format, false).unwrap();
            let adds = add_inputs_dequantized(&unfused);
            assert!(adds.iter().all(|(_, dq)| !dq[0] && !dq[1]), "{file} {format:?}: {adds:?}");
            assert_eq!(summary.float_adds.len(), adds.len());
        }
    }
}

/// Every Q/DQ model loads in ONNX Runtime with full optimizations and
/// classifies a batch.
#[test]
fn quantized_models_load_and_run_in_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    for file in MODELS {
        let model = load(file);
        for format in FORMATS {
            let (quantized, _) = qdq::quantize(&model, &ranges(&model), format, true).unwrap();
            let path = dir.path().join("q.onnx");
            std::fs::write(&path, quantized.encode_to_vec()).unwrap();
            let mut session = InferenceSession::open(&path, 1, None).unwrap();
            let logits = session.run(ndarray::Array4::<f32>::ones((3, 1, 28, 28)).view()).unwrap();
            assert_eq!(logits.shape(), [3, 10], "{file} {format:?}");
            assert!(logits.iter().all(|v| v.is_finite()));
        }
    }
}

/// Exporters leave nodes unnamed and may already use a name the rewrite
/// would derive (`input_scale`): every added name is fresh, the result is
/// well formed and runs.
#[test]
fn unnamed_nodes_and_taken_names_do_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    for file in MODELS {
        let mut model = load(file);
        let graph = model.graph.as_mut().unwrap();
        graph.node.iter_mut().for_each(|n| n.name.clear());
        for taken in ["input_scale", "input_zero_point", "input_quantized", "input_dequantized"] {
            graph.initializer.push(candle_onnx::onnx::TensorProto {
                name: taken.into(),
                data_type: 1,
                float_data: vec![1.0],
                ..Default::default()
            });
        }
        for format in FORMATS {
            let (quantized, _) = qdq::quantize(&model, &ranges(&model), format, true).unwrap();
            let graph = quantized.graph.as_ref().unwrap();
            let mut names = std::collections::HashSet::new();
            for tensor in graph.initializer.iter().map(|t| &t.name).chain(graph.node.iter().flat_map(|n| &n.output)) {
                assert!(names.insert(tensor.clone()), "{file} {format:?}: `{tensor}` is defined twice");
            }
            let path = dir.path().join("q.onnx");
            std::fs::write(&path, quantized.encode_to_vec()).unwrap();
            let mut session = InferenceSession::open(&path, 1, None).unwrap();
            let logits = session.run(ndarray::Array4::<f32>::ones((2, 1, 28, 28)).view()).unwrap();
            assert!(logits.iter().all(|v| v.is_finite()), "{file} {format:?}");
        }
    }
}

/// A BatchNorm that cannot be folded does not stop the ones after it.
#[test]
fn an_unfoldable_batch_norm_does_not_stop_folding() {
    let mut model = load("tests/fixtures/graphs/bn_kept_flatten.onnx");
    let graph = model.graph.as_mut().unwrap();
    let total = graph.node.iter().filter(|n| n.op_type == "BatchNormalization").count();
    // Its own scale, one value short (the exporter shares equal BatchNorm
    // parameters between layers, so the shared one is left alone).
    let first = graph.node.iter_mut().find(|n| n.op_type == "BatchNormalization").unwrap();
    first.input[1] = "short_gamma".into();
    graph.initializer.push(candle_onnx::onnx::TensorProto {
        name: "short_gamma".into(),
        data_type: 1,
        dims: vec![7],
        float_data: vec![1.0; 7],
        ..Default::default()
    });
    let (folded, summary) = qdq::quantize(&model, &ranges(&model), Int8Format::OnnxruntimeCpu, true).unwrap();
    let left = folded.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type == "BatchNormalization").count();
    assert_eq!((summary.folded_batch_norms, left), (total - 1, 1));
}

#[test]
fn cpu_format_folds_batch_norm_and_keeps_tensorrt_format_untouched() {
    let model = load("tests/fixtures/graphs/bn_kept_flatten.onnx");
    let count = |m: &ModelProto, op: &str| m.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type == op).count();
    let (cpu, summary) = qdq::quantize(&model, &ranges(&model), Int8Format::OnnxruntimeCpu, true).unwrap();
    assert_eq!(summary.folded_batch_norms, count(&model, "BatchNormalization"));
    assert_eq!(count(&cpu, "BatchNormalization"), 0);
    let (trt, summary) = qdq::quantize(&model, &ranges(&model), Int8Format::Tensorrt, true).unwrap();
    assert_eq!(summary.folded_batch_norms, 0);
    assert_eq!(count(&trt, "BatchNormalization"), count(&model, "BatchNormalization"));
    // TensorRT's rule: no Q/DQ on the outputs of weighted ops.
    let graph = trt.graph.as_ref().unwrap();
    let index = GraphIndex::new(graph);
    for node in graph.node.iter().filter(|n| n.op_type == "QuantizeLinear") {
        let producer = index.producer(&node.input[0]).map(|p| p.op_type.as_str());
        assert!(
            !matches!(producer, Some("Conv" | "Gemm" | "MatMul")),
            "{:?} quantizes a weighted op's output",
            node.name
        );
    }
}

#[test]
fn dead_tensors_get_a_positive_scale_and_are_named() {
    let model = load("tests/fixtures/graphs/bn_folded_flatten.onnx");
    let mut ranges = ranges(&model);
    // The graph input feeds the stem conv, so every format quantizes it.
    let victim = "input".to_string();
    ranges.insert(victim.clone(), Range { amax: 0.0, nonnegative: true });
    let (quantized, summary) = qdq::quantize(&model, &ranges, Int8Format::Tensorrt, true).unwrap();
    assert!(summary.dead.contains(&victim));
    qdq::lint(&quantized, true, &Default::default()).expect("a dead tensor still lints");
}

#[test]
fn lint_names_the_node_with_a_bad_scale() {
    let model = load("tests/fixtures/graphs/bn_folded_flatten.onnx");
    let (mut quantized, _) = qdq::quantize(&model, &ranges(&model), Int8Format::Tensorrt, true).unwrap();
    let graph = quantized.graph.as_mut().unwrap();
    let scale = graph.initializer.iter_mut().find(|t| t.name.ends_with("_scale") && t.dims.is_empty()).unwrap();
    let tensor = scale.name.trim_end_matches("_scale").to_string();
    scale.raw_data = 0.0f32.to_le_bytes().to_vec();
    match qdq::lint(&quantized, true, &Default::default()) {
        Err(QdqError::Lint { node, problem }) => {
            assert!(node.starts_with(&tensor), "{node}");
            assert!(problem.contains("not positive"), "{problem}");
        }
        other => panic!("expected a lint error, got {other:?}"),
    }
}

#[test]
fn lint_rejects_a_fusion_mismatch() {
    let model = load("tests/fixtures/graphs/bn_folded_flatten.onnx");
    let (unfused, _) = qdq::quantize(&model, &ranges(&model), Int8Format::Tensorrt, false).unwrap();
    match qdq::lint(&unfused, true, &Default::default()) {
        Err(QdqError::Lint { node, problem }) => {
            assert!(node.ends_with("Add"), "{node}");
            assert!(problem.contains("shortcut input of this Add is not quantized"), "{problem}");
        }
        other => panic!("expected a lint error, got {other:?}"),
    }
}

#[test]
fn missing_statistics_are_an_error_not_a_guess() {
    let model = load("tests/fixtures/graphs/bn_folded_flatten.onnx");
    let error = qdq::quantize(&model, &HashMap::new(), Int8Format::Tensorrt, true).unwrap_err();
    assert!(matches!(error, QdqError::MissingStatistics { .. }), "{error}");
}

/// x -> Pad -> Conv: the pair goes above the Pad, and a pair between the
/// Pad and the Conv is caught by the lint.
#[test]
fn no_qdq_between_a_pad_and_its_conv() {
    use candle_onnx::onnx::{GraphProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto};
    let weight = TensorProto {
        name: "w".into(),
        dims: vec![4, 1, 3, 3],
        data_type: 1,
        float_data: vec![0.1; 36],
        ..Default::default()
    };
    let pads = TensorProto {
        name: "pads".into(),
        dims: vec![8],
        data_type: 7,
        int64_data: vec![0, 0, 1, 1, 0, 0, 1, 1],
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str| NodeProto {
        op_type: op.into(),
        name: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(GraphProto {
            node: vec![node("Pad", &["x", "pads"], "padded"), node("Conv", &["padded", "w"], "y")],
            initializer: vec![weight, pads],
            input: vec![ValueInfoProto { name: "x".into(), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let tensors = qdq::calibration_tensors(model.graph.as_ref().unwrap());
    assert_eq!(tensors[0], "x", "the Pad's input is measured, not its output");
    let ranges: HashMap<String, Range> =
        tensors.into_iter().map(|t| (t, Range { amax: 1.0, nonnegative: false })).collect();
    let (quantized, _) = qdq::quantize(&model, &ranges, Int8Format::Tensorrt, false).unwrap();
    let graph = quantized.graph.as_ref().unwrap();
    let pad = graph.node.iter().find(|n| n.op_type == "Pad").unwrap();
    assert_eq!(pad.input[0], "x_dequantized");
    assert_eq!(graph.node.iter().find(|n| n.op_type == "Conv").unwrap().input[0], "padded");

    // Move the pair below the Pad by hand: the lint refuses, naming the Conv.
    let mut bad = quantized.clone();
    let graph = bad.graph.as_mut().unwrap();
    for n in graph.node.iter_mut() {
        match n.op_type.as_str() {
            "Pad" => n.input[0] = "x".into(),
            "QuantizeLinear" if n.input[0] == "x" => n.input[0] = "padded".into(),
            "Conv" => n.input[0] = "x_dequantized".into(),
            _ => {}
        }
    }
    let pad_at = graph.node.iter().position(|n| n.op_type == "Pad").unwrap();
    let pad = graph.node.remove(pad_at);
    graph.node.insert(0, pad);
    match qdq::lint(&bad, false, &Default::default()) {
        Err(QdqError::Lint { node, problem }) => {
            assert_eq!(node, "Conv");
            assert!(problem.contains("between a Pad and this Conv"), "{problem}");
        }
        other => panic!("expected a lint error, got {other:?}"),
    }
}
