//! The calibration pass on the real reference model with real ONNX Runtime.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use ndarray::{ArrayD, IxDyn};
use qsweep::onnx::Model;
use qsweep::stages::calibrate::collect;
use qsweep::stages::StageError;

fn reference() -> Model {
    Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/models/fashion-resnet8.onnx")).unwrap()
}

fn batch(rows: usize, value: f32) -> Result<ArrayD<f32>, StageError> {
    Ok(ArrayD::from_elem(IxDyn(&[rows, 1, 28, 28]), value))
}

/// Batches of any size, including a short last one, all count, and every
/// value of every exposed tensor lands in its histogram.
#[test]
fn ragged_batches_count_every_value() {
    let dir = tempfile::tempdir().unwrap();
    let batches = vec![batch(64, 0.3), batch(64, -0.2), batch(7, 1.5)];
    let stats =
        collect(&reference().proto, dir.path(), 1, batches.into_iter(), &AtomicBool::new(false), |_| {}).unwrap();
    assert_eq!(stats.samples, 135);
    for tensor in &stats.tensors {
        let per_sample: usize = tensor.shape.iter().product();
        assert!(per_sample > 0, "{} has no shape", tensor.name);
        assert_eq!(tensor.histogram.total(), (135 * per_sample) as u64, "{}", tensor.name);
    }
    let input = stats.tensors.iter().find(|t| t.name == "input").unwrap();
    assert_eq!((input.histogram.max, input.histogram.min), (1.5, -0.2));
    assert!(!dir.path().join(".exposed.onnx").exists(), "the scratch model is removed");
}

/// What calibration health reads beyond the histograms: every image of
/// these batches is constant and all but three repeat an earlier one;
/// the last batch grew the input's range fivefold; every tensor but the
/// input names the node that writes it, and channels follow axis 1.
#[test]
fn the_pass_records_the_facts_health_needs() {
    let dir = tempfile::tempdir().unwrap();
    let batches = vec![batch(64, 0.3), batch(64, -0.2), batch(7, 1.5)];
    let stats =
        collect(&reference().proto, dir.path(), 1, batches.into_iter(), &AtomicBool::new(false), |_| {}).unwrap();
    let lint = stats.lint.unwrap();
    assert_eq!((lint.duplicates, lint.constant, lint.class_counts), (132, 135, None));
    let input = stats.tensors.iter().find(|t| t.name == "input").unwrap();
    assert_eq!((input.max_before_last_batch, input.channel_max.as_slice()), (Some(0.3), &[1.5][..]));
    assert!(input.producer.is_none());
    for tensor in stats.tensors.iter().filter(|t| t.name != "input") {
        let producer = tensor.producer.as_ref().unwrap_or_else(|| panic!("{} has no producer", tensor.name));
        assert!(!producer.node.is_empty() && !producer.op.is_empty());
        if tensor.shape.len() >= 2 {
            assert_eq!(tensor.channel_max.len(), tensor.shape[0], "{}", tensor.name);
            let max = tensor.channel_max.iter().copied().fold(0.0f32, f32::max);
            assert_eq!(max, tensor.histogram.max, "{}", tensor.name);
        }
    }
}

#[test]
fn non_finite_activations_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let batches = vec![batch(4, 0.1), batch(4, f32::NAN)];
    let error =
        collect(&reference().proto, dir.path(), 1, batches.into_iter(), &AtomicBool::new(false), |_| {}).unwrap_err();
    match error {
        StageError::Fatal(message) => {
            assert!(message.contains("tensor `input` holds 3136 NaN or infinite value(s)"), "{message}")
        }
        other => panic!("expected a fatal error, got {other:?}"),
    }
}
