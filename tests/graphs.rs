//! Graph analysis on real PyTorch exports: weighted ops and residual Adds
//! are found whatever the exporter did with BatchNorm, the shortcut kind,
//! the input order of the Add, or Flatten against Reshape.

use std::path::Path;

use qsweep::onnx::graph::{residual_adds, weighted_ops, GraphIndex};
use qsweep::onnx::Model;

fn load(relative: &str) -> Model {
    Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)).unwrap()
}

/// (skip slot, skip tensor) of each residual Add, in graph order.
fn skips(model: &Model) -> Vec<(usize, String)> {
    let index = GraphIndex::new(model.proto.graph.as_ref().unwrap());
    residual_adds(&index).into_iter().map(|a| (a.skip_slot, a.skip)).collect()
}

#[test]
fn fixtures_in_every_export_form() {
    for (file, downsample_skip) in [
        (
            "tests/fixtures/graphs/bn_kept_flatten.onnx",
            "/blocks/blocks.1/shortcut/shortcut.1/BatchNormalization_output_0",
        ),
        ("tests/fixtures/graphs/bn_folded_flatten.onnx", "/blocks/blocks.1/shortcut/shortcut.0/Conv_output_0"),
        ("tests/fixtures/graphs/bn_folded_reshape.onnx", "/blocks/blocks.1/shortcut/shortcut.0/Conv_output_0"),
    ] {
        let model = load(file);
        // The skip is the Add's first input in these exports.
        assert_eq!(
            skips(&model),
            [(0, "/stem/stem.2/Relu_output_0".to_string()), (0, downsample_skip.to_string())],
            "{file}"
        );
        let index = GraphIndex::new(model.proto.graph.as_ref().unwrap());
        let ops = weighted_ops(&index);
        assert_eq!(ops.iter().filter(|o| o.op_type == "Conv").count(), 6, "{file}");
        let gemm = ops.iter().find(|o| o.op_type == "Gemm").expect("the classifier");
        assert_eq!(gemm.weight.as_ref().unwrap().channel_axis, 0, "PyTorch's Linear exports Gemm with transB=1");
        assert!(ops.iter().all(|o| o.activations.len() == 1 && o.weight.is_some()), "{file}");
    }
}

#[test]
fn reference_model_has_three_residual_blocks() {
    let model = load("experiments/models/fashion-resnet8.onnx");
    let found = skips(&model);
    assert_eq!(found.len(), 3);
    // The training script writes `out + skip`, so the shortcut is input 1.
    assert!(found.iter().all(|(slot, _)| *slot == 1), "{found:?}");
}
