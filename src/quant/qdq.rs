//! The Q/DQ rewrite: inserts QuantizeLinear/DequantizeLinear pairs where
//! TensorRT's explicit-quantization rules put them, then lints the result.
//!
//! The rewrite is planned first (`edges`) and applied in one step, so the
//! calibrate stage and the build stage agree on which tensors are quantized:
//! calibrate measures exactly the tensors the rewrite will need.
//!
//! Rules: quantize every input of Conv, Gemm and MatMul (activations per
//! tensor, constant weights per output channel), never their outputs;
//! leave BatchNorm and ReLU to the engine; with residual fusion, also
//! quantize the shortcut input of each residual Add, which is what
//! pytorch_quantization's `residual_quantizer` does, so TensorRT can fuse
//! the Add into the conv producing the other input. A Q/DQ pair is never
//! put between a Pad and its Conv: the Pad's input is quantized instead.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, NodeProto,
    TensorProto,
};

use crate::onnx::graph::{node_name, residual_adds, weighted_ops, GraphIndex, WEIGHTED_OPS};

/// int8 narrow range: scale = amax / 127.
const QMAX: f32 = 127.0;
/// The scale of a dead (all-zero) tensor or channel: any positive value
/// represents zero exactly, and TensorRT rejects zero scales.
pub const DEAD_SCALE: f32 = 1.0 / (1u32 << 20) as f32;
/// Per-channel Q/DQ (the `axis` attribute) needs opset 13.
pub const MIN_OPSET: i64 = 13;

/// One input slot that reads a quantized activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub node: usize,
    pub slot: usize,
    pub tensor: String,
}

/// The activation inputs to quantize: weighted ops' runtime inputs and,
/// with fusion, residual shortcuts.
pub fn edges(graph: &GraphProto, residual_fusion: bool) -> Vec<Edge> {
    let index = GraphIndex::new(graph);
    let mut edges = Vec::new();
    for op in weighted_ops(&index) {
        for (slot, tensor) in op.activations {
            // Pad -> Q/DQ -> Conv blocks TensorRT's Pad fusion; move the
            // pair above the Pad.
            match index.producer(&tensor).filter(|p| p.op_type == "Pad") {
                Some(pad) => {
                    let pad_index =
                        graph.node.iter().position(|n| std::ptr::eq(n, pad)).expect("the producer is in the graph");
                    edges.push(Edge { node: pad_index, slot: 0, tensor: pad.input[0].clone() });
                }
                None => edges.push(Edge { node: op.node, slot, tensor }),
            }
        }
    }
    if residual_fusion {
        for add in residual_adds(&index) {
            edges.push(Edge { node: add.node, slot: add.skip_slot, tensor: add.skip });
        }
    }
    edges
}

/// Every activation tensor that any recipe may quantize, in graph order,
/// each once: what the calibrate stage measures.
pub fn calibration_tensors(graph: &GraphProto) -> Vec<String> {
    let mut seen = HashSet::new();
    edges(graph, true).into_iter().map(|e| e.tensor).filter(|t| seen.insert(t.clone())).collect()
}

/// What the rewrite did, for the reports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QdqSummary {
    /// Q/DQ pairs on activations plus DQ nodes on weights.
    pub qdq_pairs: usize,
    /// Weight channels and activations that were all zero, by name.
    pub dead: Vec<String>,
    /// Residual Adds left with a float shortcut.
    pub float_adds: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QdqError {
    #[error("the model has no Conv, Gemm or MatMul node, so there is nothing to quantize")]
    NothingToQuantize,
    #[error("the model uses opset {found}; per-channel Q/DQ needs opset {MIN_OPSET} or later. Re-export it with opset_version={MIN_OPSET} or higher")]
    OpsetTooOld { found: i64 },
    #[error("no calibration statistics for tensor `{tensor}`; the calibrate stage is older than this build, rerun it")]
    MissingStatistics { tensor: String },
    #[error("weight `{tensor}` of node `{node}` {problem}")]
    BadWeight { node: String, tensor: String, problem: String },
    #[error("lint failed at node `{node}`: {problem}")]
    Lint { node: String, problem: String },
}

/// Rewrites `model` into a Q/DQ model. `amax` maps every tensor of
/// `calibration_tensors` to its calibrated amax.
pub fn quantize(
    model: &ModelProto,
    amax: &HashMap<String, f32>,
    residual_fusion: bool,
) -> Result<(ModelProto, QdqSummary), QdqError> {
    let opset = default_opset(model);
    if opset < MIN_OPSET {
        return Err(QdqError::OpsetTooOld { found: opset });
    }
    let mut model = model.clone();
    let graph = model.graph.as_mut().expect("a loaded model has a graph");
    let ops = weighted_ops(&GraphIndex::new(graph));
    if ops.is_empty() {
        return Err(QdqError::NothingToQuantize);
    }
    let mut summary = QdqSummary::default();

    // Activations: one pair per tensor, shared by all the edges reading it.
    let edges = edges(graph, residual_fusion);
    let mut pairs: BTreeMap<String, String> = BTreeMap::new();
    for edge in &edges {
        let &value =
            amax.get(&edge.tensor).ok_or_else(|| QdqError::MissingStatistics { tensor: edge.tensor.clone() })?;
        if value == 0.0 {
            summary.dead.push(edge.tensor.clone());
        }
        pairs.entry(edge.tensor.clone()).or_insert_with(|| format!("{}_dequantized", edge.tensor));
    }
    summary.dead.dedup();
    let mut after_producer: HashMap<String, Vec<NodeProto>> = HashMap::new();
    let producers: HashMap<String, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
    let mut leading = Vec::new();
    for (tensor, dequantized) in &pairs {
        let scale = scale_of(amax[tensor]);
        let (nodes, initializers) = activation_pair(tensor, dequantized, scale);
        graph.initializer.extend(initializers);
        match producers.get(tensor) {
            Some(&producer) => after_producer.entry(graph.node[producer].output[0].clone()).or_default().extend(nodes),
            None => leading.extend(nodes),
        }
        summary.qdq_pairs += 1;
    }
    for edge in &edges {
        graph.node[edge.node].input[edge.slot] = pairs[&edge.tensor].clone();
    }

    // Weights: stored as int8 with one DequantizeLinear each.
    let mut replaced = HashSet::new();
    for op in &ops {
        let Some(weight) = &op.weight else { continue };
        let Some(position) = graph.initializer.iter().position(|t| t.name == weight.tensor) else { continue };
        let original = graph.initializer[position].clone();
        let (int8, scales, dead) = quantize_weight(&original, weight.channel_axis)
            .map_err(|problem| QdqError::BadWeight { node: op.name.clone(), tensor: weight.tensor.clone(), problem })?;
        summary.dead.extend(dead.into_iter().map(|c| format!("{}[{c}]", weight.tensor)));
        let dequantized = format!("{}_dequantized", weight.tensor);
        if replaced.insert(weight.tensor.clone()) {
            let (node, initializers) = weight_dequantize(&original, int8, scales, weight.channel_axis, &dequantized);
            graph.initializer.extend(initializers);
            leading.push(node);
            summary.qdq_pairs += 1;
        }
        graph.node[op.node].input[weight.slot] = dequantized;
    }
    graph.initializer.retain(|t| !replaced.contains(&t.name));

    // Keep the nodes topologically sorted: weight DQs and graph-input pairs
    // first, each activation pair right after its producer.
    let mut nodes = leading;
    for node in std::mem::take(&mut graph.node) {
        let pending = node.output.first().and_then(|o| after_producer.remove(o));
        nodes.push(node);
        nodes.extend(pending.into_iter().flatten());
    }
    graph.node = nodes;

    let index = GraphIndex::new(graph);
    summary.float_adds = residual_adds(&index)
        .into_iter()
        .filter(|add| index.producer(&add.skip).is_none_or(|p| p.op_type != "DequantizeLinear"))
        .map(|add| add.name)
        .collect();
    lint(&model, residual_fusion)?;
    Ok((model, summary))
}

fn scale_of(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / QMAX
    } else {
        DEAD_SCALE
    }
}

fn default_opset(model: &ModelProto) -> i64 {
    model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(1, |o| o.version)
}

fn activation_pair(tensor: &str, dequantized: &str, scale: f32) -> (Vec<NodeProto>, Vec<TensorProto>) {
    let scale_name = format!("{tensor}_scale");
    let zero_name = format!("{tensor}_zero_point");
    let quantized = format!("{tensor}_quantized");
    let nodes = vec![
        node(
            "QuantizeLinear",
            &format!("{tensor}_QuantizeLinear"),
            &[tensor, &scale_name, &zero_name],
            &quantized,
            None,
        ),
        node(
            "DequantizeLinear",
            &format!("{tensor}_DequantizeLinear"),
            &[&quantized, &scale_name, &zero_name],
            dequantized,
            None,
        ),
    ];
    let initializers = vec![float_tensor(&scale_name, &[], &[scale]), int8_tensor(&zero_name, &[], &[0])];
    (nodes, initializers)
}

fn weight_dequantize(
    original: &TensorProto,
    int8: Vec<i8>,
    scales: Vec<f32>,
    axis: usize,
    dequantized: &str,
) -> (NodeProto, Vec<TensorProto>) {
    let name = &original.name;
    let (int8_name, scale_name, zero_name) =
        (format!("{name}_int8"), format!("{name}_scale"), format!("{name}_zero_point"));
    let channels = scales.len() as i64;
    let node = node(
        "DequantizeLinear",
        &format!("{name}_DequantizeLinear"),
        &[&int8_name, &scale_name, &zero_name],
        dequantized,
        Some(axis as i64),
    );
    let initializers = vec![
        int8_tensor(&int8_name, &original.dims, &int8),
        float_tensor(&scale_name, &[channels], &scales),
        int8_tensor(&zero_name, &[channels], &vec![0; scales.len()]),
    ];
    (node, initializers)
}

/// Symmetric per-channel int8 by max: returns the int8 values, one scale
/// per channel, and the indices of all-zero channels.
fn quantize_weight(weight: &TensorProto, axis: usize) -> Result<(Vec<i8>, Vec<f32>, Vec<usize>), String> {
    let values = float_values(weight)?;
    let dims: Vec<usize> = weight.dims.iter().map(|&d| d as usize).collect();
    if axis >= dims.len() {
        return Err(format!("has {} dimensions, so it has no channel axis {axis}", dims.len()));
    }
    let channels = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let channel_of = |i: usize| (i / inner) % channels;
    let mut amax = vec![0.0f32; channels];
    for (i, v) in values.iter().enumerate() {
        if !v.is_finite() {
            return Err(format!("holds a non-finite value at flat index {i}"));
        }
        let c = channel_of(i);
        amax[c] = amax[c].max(v.abs());
    }
    let scales: Vec<f32> = amax.iter().map(|&a| scale_of(a)).collect();
    let int8 = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[channel_of(i)]).round_ties_even().clamp(-QMAX, QMAX) as i8)
        .collect();
    let dead = amax.iter().enumerate().filter(|(_, &a)| a == 0.0).map(|(c, _)| c).collect();
    Ok((int8, scales, dead))
}

/// A float tensor's values, from `float_data` or little-endian `raw_data`.
pub fn float_values(tensor: &TensorProto) -> Result<Vec<f32>, String> {
    if tensor.data_type != DataType::Float as i32 {
        return Err(format!("has element type {}, not float32", tensor.data_type));
    }
    if !tensor.float_data.is_empty() {
        return Ok(tensor.float_data.clone());
    }
    if tensor.raw_data.len() % 4 != 0 {
        return Err("has raw data that is not a whole number of floats".into());
    }
    Ok(tensor.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn int8_tensor(name: &str, dims: &[i64], values: &[i8]) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: DataType::Int8 as i32,
        raw_data: values.iter().map(|&v| v as u8).collect(),
        ..Default::default()
    }
}

fn node(op_type: &str, name: &str, inputs: &[&str], output: &str, axis: Option<i64>) -> NodeProto {
    NodeProto {
        op_type: op_type.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute: axis
            .map(|axis| AttributeProto {
                name: "axis".into(),
                r#type: AttributeType::Int as i32,
                i: axis,
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// Checks a Q/DQ model against what TensorRT's parser and fuser accept.
/// The first problem found names its node.
pub fn lint(model: &ModelProto, residual_fusion: bool) -> Result<(), QdqError> {
    let graph = model.graph.as_ref().expect("a model has a graph");
    let index = GraphIndex::new(graph);
    let initializer = |name: &str| graph.initializer.iter().find(|t| t.name == name);
    let fail = |node: &str, problem: String| Err(QdqError::Lint { node: node.to_string(), problem });

    for (i, node) in graph.node.iter().enumerate() {
        let name = node_name(node, i);
        if node.op_type == "QuantizeLinear" || node.op_type == "DequantizeLinear" {
            let axis = crate::onnx::graph::int_attribute(node, "axis");
            if axis.is_some() && default_opset(model) < MIN_OPSET {
                return fail(
                    &name,
                    format!("per-channel axis needs opset {MIN_OPSET}, the model has {}", default_opset(model)),
                );
            }
            let Some(scale) = node.input.get(1).and_then(|s| initializer(s)) else {
                return fail(&name, "its scale is not a constant initializer".into());
            };
            let scales = float_values(scale)
                .map_err(|p| QdqError::Lint { node: name.clone(), problem: format!("scale {p}") })?;
            if let Some(bad) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
                return fail(&name, format!("scale {} at channel {bad} is not positive and finite", scales[bad]));
            }
        }
        if WEIGHTED_OPS.contains(&node.op_type.as_str()) {
            if let Some(dq) =
                node.input.get(1).and_then(|w| index.producer(w)).filter(|p| p.op_type == "DequantizeLinear")
            {
                let expected_axis = match node.op_type.as_str() {
                    "Conv" => 0,
                    "Gemm" if crate::onnx::graph::int_attribute(node, "transB") == Some(1) => 0,
                    _ => 1,
                };
                let axis = crate::onnx::graph::int_attribute(dq, "axis").unwrap_or(1);
                let weight = initializer(&dq.input[0]);
                let scale_len = initializer(&dq.input[1]).map_or(0, |s| s.dims.iter().product::<i64>().max(1));
                let channels = weight.and_then(|w| w.dims.get(expected_axis)).copied().unwrap_or(-1);
                if axis != expected_axis as i64 || scale_len != channels {
                    return fail(
                        &name,
                        format!(
                            "weight scales run along axis {axis} with {scale_len} values, but its output channels are axis {expected_axis} with {channels}"
                        ),
                    );
                }
            }
        }
        if node.op_type == "Conv" {
            let through_qdq_from_pad = index
                .producer(&node.input[0])
                .filter(|p| p.op_type == "DequantizeLinear")
                .and_then(|dq| index.producer(&dq.input[0]))
                .filter(|q| q.op_type == "QuantizeLinear")
                .and_then(|q| index.producer(&q.input[0]))
                .is_some_and(|p| p.op_type == "Pad");
            if through_qdq_from_pad {
                return fail(
                    &name,
                    "a Q/DQ pair sits between a Pad and this Conv; TensorRT cannot fuse the Pad".into(),
                );
            }
        }
    }
    for add in residual_adds(&index) {
        let node = &graph.node[add.node];
        let dequantized: Vec<bool> =
            node.input.iter().map(|t| index.producer(t).is_some_and(|p| p.op_type == "DequantizeLinear")).collect();
        if residual_fusion && !dequantized[add.skip_slot] {
            return fail(
                &add.name,
                "residual fusion is on, but the shortcut input of this Add is not quantized".into(),
            );
        }
        if !residual_fusion && dequantized.iter().any(|&d| d) {
            return fail(&add.name, "residual fusion is off, but an input of this Add is quantized".into());
        }
    }
    Ok(())
}
