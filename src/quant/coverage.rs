//! How much of a built model really runs in int8, counted from the graph
//! ONNX Runtime saved after optimizing it, so reports show the effect of a
//! recipe instead of leaving users to infer it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::onnx::Model;

/// Weighted ops that ONNX Runtime runs with integer kernels.
const INT8_WEIGHTED: [&str; 6] =
    ["QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat"];
/// Weighted ops that run in float, including ONNX Runtime's fused forms.
const FLOAT_WEIGHTED: [&str; 7] = ["Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    pub int8_weighted_ops: usize,
    pub float_weighted_ops: usize,
    /// int8 share of the weighted ops, 0..=1.
    pub int8_share: f64,
    /// Q/DQ nodes still in the optimized graph (not fused into kernels).
    pub leftover_qdq: usize,
    /// Op type counts of the optimized graph.
    pub op_types: BTreeMap<String, usize>,
}

pub fn of(_source: &Model, built: &Model) -> Coverage {
    let mut op_types = BTreeMap::new();
    for node in &built.proto.graph.as_ref().expect("a model has a graph").node {
        *op_types.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    let count = |kinds: &[&str]| kinds.iter().map(|k| op_types.get(*k).copied().unwrap_or(0)).sum::<usize>();
    let int8 = count(&INT8_WEIGHTED);
    let float = count(&FLOAT_WEIGHTED);
    Coverage {
        int8_weighted_ops: int8,
        float_weighted_ops: float,
        int8_share: if int8 + float == 0 { 0.0 } else { int8 as f64 / (int8 + float) as f64 },
        leftover_qdq: count(&["QuantizeLinear", "DequantizeLinear"]),
        op_types,
    }
}
