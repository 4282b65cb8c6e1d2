//! How much of a built model really runs in int8, counted from the graph
//! ONNX Runtime saved after optimizing it, so reports show the effect of a
//! recipe instead of leaving users to infer it (TensorRT users ask this
//! often: #4020, #4341, #3038, #4366).
//!
//! Optimized nodes keep the name of the node they came from, with a
//! `_token_N` suffix when a Q/DQ group became one int8 kernel, which is how
//! each original weighted op is matched to what it became.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::onnx::graph::{residual_adds, weighted_ops, GraphIndex, WeightedOp};
use crate::onnx::Model;

/// Weighted ops that ONNX Runtime runs with integer kernels.
const INT8_WEIGHTED: [&str; 6] =
    ["QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    pub weighted_ops: usize,
    pub int8_weighted_ops: usize,
    /// int8 share of the weighted ops, 0..=1.
    pub int8_share: f64,
    /// int8 share of the weighted ops' multiply-adds at batch 1, when
    /// every op's input shape is known.
    pub int8_flop_share: Option<f64>,
    /// Weighted ops left in float, by name.
    pub float_ops: Vec<String>,
    /// Residual Adds of the model, and those the optimized graph still
    /// runs in float (not fused into a `QLinearAdd`), by name: counted on
    /// the engine, since a Q/DQ pair around an Add is only a request.
    pub residual_adds: usize,
    pub float_residual_adds: Vec<String>,
    /// Op type counts of the optimized graph.
    pub op_types: BTreeMap<String, usize>,
}

/// `source` is the fp32 model, `built` the optimized graph, `shapes` the
/// per-sample shapes of activations measured at calibration.
pub fn of(source: &Model, built: &Model, shapes: &HashMap<String, Vec<usize>>) -> Coverage {
    let built_graph = built.proto.graph.as_ref().expect("a model has a graph");
    let mut op_types = BTreeMap::new();
    let mut int8_names = Vec::new();
    for node in &built_graph.node {
        *op_types.entry(node.op_type.clone()).or_insert(0) += 1;
        if INT8_WEIGHTED.contains(&node.op_type.as_str()) {
            int8_names.push(original_name(&node.name));
        }
    }
    let graph = source.proto.graph.as_ref().expect("a model has a graph");
    let index = GraphIndex::new(graph);
    let ops = weighted_ops(&index);
    let adds = residual_adds(&index);
    // ONNX Runtime's QDQ fusion keeps the Add's name on its QLinearAdd.
    let int8_adds: Vec<&str> =
        built_graph.node.iter().filter(|n| n.op_type == "QLinearAdd").map(|n| original_name(&n.name)).collect();
    let float_residual_adds =
        adds.iter().filter(|add| !int8_adds.contains(&add.name.as_str())).map(|add| add.name.clone()).collect();
    let (mut total_flops, mut int8_flops, mut known) = (0u64, 0u64, true);
    let mut float_ops = Vec::new();
    for op in &ops {
        let is_int8 = int8_names.contains(&op.name.as_str());
        if !is_int8 {
            float_ops.push(op.name.clone());
        }
        match multiply_adds(graph, op, shapes) {
            Some(flops) => {
                total_flops += flops;
                int8_flops += if is_int8 { flops } else { 0 };
            }
            None => known = false,
        }
    }
    let int8 = ops.len() - float_ops.len();
    Coverage {
        weighted_ops: ops.len(),
        int8_weighted_ops: int8,
        int8_share: if ops.is_empty() { 0.0 } else { int8 as f64 / ops.len() as f64 },
        int8_flop_share: (known && total_flops > 0).then(|| int8_flops as f64 / total_flops as f64),
        float_ops,
        residual_adds: adds.len(),
        float_residual_adds,
        op_types,
    }
}

/// `conv1/Conv_token_5` -> `conv1/Conv`.
fn original_name(name: &str) -> &str {
    match name.rfind("_token_") {
        Some(at) if name[at + 7..].chars().all(|c| c.is_ascii_digit()) => &name[..at],
        _ => name,
    }
}

/// Multiply-adds of one weighted op for one sample: each weight element
/// is used once per output position (grouped convs included, since their
/// weights hold only Cin/group input channels).
fn multiply_adds(
    graph: &candle_onnx::onnx::GraphProto,
    op: &WeightedOp,
    shapes: &HashMap<String, Vec<usize>>,
) -> Option<u64> {
    let weight = op.weight.as_ref()?;
    let dims: Vec<u64> =
        graph.initializer.iter().find(|t| t.name == weight.tensor)?.dims.iter().map(|&d| d as u64).collect();
    let weight_elements: u64 = dims.iter().product();
    let node = &graph.node[op.node];
    match op.op_type.as_str() {
        "Conv" => {
            let input = shapes.get(&op.activations.first()?.1)?;
            let ints = |name: &str, default: i64| -> Vec<i64> {
                node.attribute.iter().find(|a| a.name == name).map_or(vec![default; 2], |a| a.ints.clone())
            };
            let (strides, dilations, pads) = (ints("strides", 1), ints("dilations", 1), ints("pads", 0));
            let spatial = input.len().checked_sub(1)?;
            let mut positions = 1u64;
            for axis in 0..spatial {
                let size = input[axis + 1] as i64;
                let kernel = *dims.get(axis + 2)? as i64;
                let pad = pads.get(axis).copied().unwrap_or(0) + pads.get(axis + spatial).copied().unwrap_or(0);
                let dilation = dilations.get(axis).copied().unwrap_or(1);
                let stride = strides.get(axis).copied().unwrap_or(1).max(1);
                let out = (size + pad - dilation * (kernel - 1) - 1) / stride + 1;
                positions *= out.max(0) as u64;
            }
            Some(weight_elements * positions)
        }
        _ => {
            let input = shapes.get(&op.activations.first()?.1)?;
            let rows: u64 = input.iter().rev().skip(1).map(|&d| d as u64).product();
            Some(weight_elements * rows.max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimized_names_map_back_to_their_source() {
        assert_eq!(original_name("/blocks/blocks.0/conv1/Conv_token_1"), "/blocks/blocks.0/conv1/Conv");
        assert_eq!(original_name("/fc/Gemm"), "/fc/Gemm");
        assert_eq!(original_name("odd_token_name"), "odd_token_name");
    }
}
