//! Exports without dynamic axes fix the batch at 1 (`torch.onnx.export`
//! without `dynamic_axes`). Such a graph usually runs any batch once its
//! input and outputs say so, because PyTorch exports `flatten` as Flatten
//! and `view(x.size(0), -1)` as a computed shape. It cannot where a
//! constant shape hard-codes the 1 (a Reshape to `[1, 512]`); that model
//! is measured at batch 1 only.

use candle_onnx::onnx::tensor_shape_proto::dimension::Value as DimValue;
use candle_onnx::onnx::type_proto::Value as TypeValue;
use candle_onnx::onnx::{GraphProto, ModelProto, ValueInfoProto};

use super::graph::node_name;
use super::tensor_numbers;

/// The name the freed batch axis gets.
pub const BATCH: &str = "batch";

/// Why the batch axis is stuck at 1, if the input fixes it at 1 and a
/// constant shape hard-codes it (validation asks this; nothing is copied).
pub fn fixed_at_one(model: &ModelProto) -> Option<String> {
    let graph = model.graph.as_ref()?;
    fixed_at_one_input(graph)?;
    hard_coded_batch(graph)
}

/// The model with its batch axis freed, if the input fixes it at 1 and the
/// graph allows; `None` when there is nothing to do or it cannot be done.
pub fn free_batch(model: &ModelProto) -> Option<ModelProto> {
    let graph = model.graph.as_ref()?;
    let input_name = fixed_at_one_input(graph)?.name.clone();
    if hard_coded_batch(graph).is_some() {
        return None;
    }
    let mut freed = model.clone();
    let graph = freed.graph.as_mut().expect("checked above");
    for info in graph.input.iter_mut().filter(|i| i.name == input_name).chain(graph.output.iter_mut()) {
        if let Some(dim) = leading_dim_mut(info).filter(|d| **d == DimValue::DimValue(1)) {
            *dim = DimValue::DimParam(BATCH.into());
        }
    }
    // Inferred shapes of inner tensors still say 1; ONNX Runtime infers them again.
    graph.value_info.clear();
    Some(freed)
}

/// The one runtime input, if its batch axis is fixed at 1.
fn fixed_at_one_input(graph: &GraphProto) -> Option<&ValueInfoProto> {
    let runtime_inputs: Vec<&ValueInfoProto> =
        graph.input.iter().filter(|i| !graph.initializer.iter().any(|init| init.name == i.name)).collect();
    let [input] = runtime_inputs.as_slice() else { return None };
    (leading_dim(input) == Some(&DimValue::DimValue(1))).then_some(*input)
}

/// A Reshape whose constant target shape starts with 1 keeps the batch at 1.
fn hard_coded_batch(graph: &GraphProto) -> Option<String> {
    let constant = |name: &str| -> Option<Vec<f64>> {
        if let Some(init) = graph.initializer.iter().find(|t| t.name == name) {
            return tensor_numbers(init).ok();
        }
        let node =
            graph.node.iter().find(|n| n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name))?;
        node.attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref())
            .and_then(|t| tensor_numbers(t).ok())
    };
    graph.node.iter().enumerate().find_map(|(index, node)| {
        let shape = (node.op_type == "Reshape").then(|| node.input.get(1).and_then(|s| constant(s))).flatten()?;
        (shape.first() == Some(&1.0) && shape.len() > 1).then(|| {
            format!(
                "Reshape `{}` hard-codes the shape {:?}",
                node_name(node, index),
                shape.iter().map(|&v| v as i64).collect::<Vec<_>>()
            )
        })
    })
}

fn leading_dim(info: &ValueInfoProto) -> Option<&DimValue> {
    match info.r#type.as_ref()?.value.as_ref()? {
        TypeValue::TensorType(tensor) => tensor.shape.as_ref()?.dim.first()?.value.as_ref(),
        _ => None,
    }
}

fn leading_dim_mut(info: &mut ValueInfoProto) -> Option<&mut DimValue> {
    match info.r#type.as_mut()?.value.as_mut()? {
        TypeValue::TensorType(tensor) => tensor.shape.as_mut()?.dim.first_mut()?.value.as_mut(),
        _ => None,
    }
}
