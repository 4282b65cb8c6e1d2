//! The Q/DQ rewrite: inserts QuantizeLinear/DequantizeLinear pairs where
//! an engine's int8 kernels need them, then lints the result.
//!
//! The rewrite is three patches (`onnx::patch`), each built against the
//! graph as the previous one left it and checked when applied: Identity
//! inlining, BatchNorm folding (the CPU format), and Q/DQ insertion. Which
//! tensors get Q/DQ is planned first (`edges`), so the calibrate stage and
//! the build stage agree on it: calibrate measures every tensor any format
//! may need.
//!
//! The `tensorrt` format follows TensorRT's explicit-quantization rules:
//! quantize every input of Conv, Gemm and MatMul (activations per tensor,
//! constant weights per output channel), never their outputs; leave
//! BatchNorm and ReLU to the engine; with residual fusion, also quantize the
//! shortcut input of each residual Add, which is what pytorch_quantization's
//! `residual_quantizer` does, so TensorRT can fuse the Add into the conv
//! producing the other input. A Q/DQ pair is never put between a Pad and its
//! Conv: the Pad's input is quantized instead.
//!
//! ONNX Runtime's CPU kernels need more: a weighted op becomes an int8
//! kernel only as DQ -> op -> Q with an int32 bias, and BatchNorm must be
//! folded first because the optimizer cannot fold it into DQ'd weights. So
//! the `onnxruntime-cpu` format folds BatchNorm, also quantizes the outputs
//! of weighted ops (after their ReLU, which ONNX Runtime then drops into the
//! quantizer) and, with fusion, of residual Adds; uses uint8 activations
//! (zero point 0 for tensors that are never negative, 128 otherwise); and
//! uses 7-bit weights, because AVX2 without VNNI multiplies uint8 by int8
//! into saturating int16 pairs, which full-range weights overflow.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, NodeProto,
    TensorProto,
};

use crate::onnx::graph::{int_attribute, node_name, residual_adds, weighted_ops, GraphIndex, WEIGHTED_OPS};
use crate::onnx::patch::{Malformed, Names, Patch, Place};
use crate::spec::{FallbackPrecision, Int8Format};

/// The scale of a dead (all-zero) tensor or channel: any positive value
/// represents zero exactly, and TensorRT rejects zero scales.
pub const DEAD_SCALE: f32 = 1.0 / (1u32 << 20) as f32;
/// Per-channel Q/DQ (the `axis` attribute) needs opset 13.
pub const MIN_OPSET: i64 = 13;

/// What calibration says about one activation tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub amax: f32,
    /// Never negative on the calibration set (e.g. after a ReLU).
    pub nonnegative: bool,
}

/// One input slot that reads a quantized activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub node: usize,
    pub slot: usize,
    pub tensor: String,
    /// The quantized op this quantizer belongs to (a weighted op or a
    /// residual Add, by node name): leaving that op in float removes it.
    pub owner: String,
    /// Whether it quantizes the owner's output for its consumers (the
    /// `onnxruntime-cpu` format), rather than an input the owner reads.
    pub output: bool,
}

/// One op a recipe quantizes: a weighted op (its weight and activation
/// inputs) or, with fusion, a residual Add (its shortcut). The unit that
/// sensitivity ranks and `float_layers` leaves in float.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuantizedOp {
    /// The ONNX node's name (`OpType#index` for an unnamed node).
    pub name: String,
    pub op_type: String,
    /// The activation tensors quantized for it, and its weight.
    pub inputs: Vec<String>,
}

/// Which ops stay in float, and in what precision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fallback {
    pub ops: BTreeSet<String>,
    pub precision: FallbackPrecision,
}

/// The activation inputs to quantize in `format`: weighted ops' runtime
/// inputs, with fusion the residual shortcuts, and for ONNX Runtime's CPU
/// kernels the outputs of weighted ops (and of residual Adds with fusion).
pub fn edges(graph: &GraphProto, format: Int8Format, residual_fusion: bool) -> Vec<Edge> {
    let index = GraphIndex::new(graph);
    let mut edges = Vec::new();
    for op in weighted_ops(&index) {
        for (slot, tensor) in op.activations {
            // Pad -> Q/DQ -> Conv blocks TensorRT's Pad fusion; move the
            // pair above the Pad.
            let owner = op.name.clone();
            match index.producer_index(&tensor).filter(|&p| graph.node[p].op_type == "Pad") {
                Some(pad) => edges.push(Edge {
                    node: pad,
                    slot: 0,
                    tensor: graph.node[pad].input[0].clone(),
                    owner,
                    output: false,
                }),
                None => edges.push(Edge { node: op.node, slot, tensor, owner, output: false }),
            }
        }
    }
    let adds = residual_adds(&index);
    if residual_fusion {
        for add in &adds {
            edges.push(Edge {
                node: add.node,
                slot: add.skip_slot,
                tensor: add.skip.clone(),
                owner: add.name.clone(),
                output: false,
            });
        }
    }
    if format == Int8Format::OnnxruntimeCpu {
        let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
        let residual_nodes: HashSet<usize> = adds.iter().map(|a| a.node).collect();
        let mut producers: Vec<usize> = weighted_ops(&index).into_iter().map(|op| op.node).collect();
        if residual_fusion {
            producers.extend(&residual_nodes);
        }
        for producer in producers {
            let tensor = quantized_output(&index, producer);
            if graph_outputs.contains(tensor.as_str()) {
                continue;
            }
            let consumers = index.consumers(&tensor);
            // Without fusion, a residual Add keeps both inputs in float.
            if !residual_fusion && consumers.iter().any(|(node, _)| residual_nodes.contains(node)) {
                continue;
            }
            let owner = node_name(&graph.node[producer], producer);
            edges.extend(consumers.into_iter().map(|(node, slot)| Edge {
                node,
                slot,
                tensor: tensor.clone(),
                owner: owner.clone(),
                output: true,
            }));
        }
    }
    edges
}

/// Where a node's output is quantized: after a BatchNorm that will be
/// folded into it and a ReLU that the quantizer absorbs, when each is the
/// only consumer.
fn quantized_output(index: &GraphIndex<'_>, node: usize) -> String {
    let mut tensor = index.graph.node[node].output[0].clone();
    for absorbed in ["BatchNormalization", "Relu"] {
        if let [(consumer, 0)] = index.consumers(&tensor)[..] {
            if index.graph.node[consumer].op_type == absorbed {
                tensor = index.graph.node[consumer].output[0].clone();
            }
        }
    }
    tensor
}

/// The ops a recipe quantizes, in graph order: what sensitivity ranks.
pub fn quantized_ops(graph: &GraphProto, format: Int8Format, residual_fusion: bool) -> Vec<QuantizedOp> {
    let index = GraphIndex::new(graph);
    let edges = edges(graph, format, residual_fusion);
    let inputs_of = |owner: &str| -> Vec<String> {
        let mut inputs: Vec<String> = Vec::new();
        for edge in edges.iter().filter(|e| e.owner == owner && !e.output) {
            if !inputs.contains(&edge.tensor) {
                inputs.push(edge.tensor.clone());
            }
        }
        inputs
    };
    let mut ops: Vec<(usize, QuantizedOp)> = weighted_ops(&index)
        .into_iter()
        .map(|op| {
            let mut inputs = inputs_of(&op.name);
            inputs.extend(op.weight.map(|w| w.tensor));
            (op.node, QuantizedOp { name: op.name, op_type: op.op_type, inputs })
        })
        .collect();
    if residual_fusion {
        ops.extend(residual_adds(&index).into_iter().map(|add| {
            (add.node, QuantizedOp { inputs: inputs_of(&add.name), name: add.name, op_type: "Add".to_string() })
        }));
    }
    ops.sort_by_key(|(node, _)| *node);
    ops.into_iter().map(|(_, op)| op).collect()
}

/// The ops that leaving `ops` in float puts in float: an op in float
/// reads its activations unquantized, so the Q/DQ pair on each of them
/// goes, and every other op that reads that tensor through the same pair
/// loses its quantized input and is in float too (TensorRT could not run
/// it in int8 either). Without this, a pair shared by two ops (a block's
/// input, read by its first conv and its shortcut) would survive either
/// one alone, and no single op would show what the pair costs.
pub fn float_closure(
    graph: &GraphProto,
    format: Int8Format,
    residual_fusion: bool,
    ops: &BTreeSet<String>,
) -> BTreeSet<String> {
    let edges: Vec<Edge> = edges(graph, format, residual_fusion).into_iter().filter(|e| !e.output).collect();
    let mut closure = ops.clone();
    loop {
        let unquantized: HashSet<&str> =
            edges.iter().filter(|e| closure.contains(&e.owner)).map(|e| e.tensor.as_str()).collect();
        let before = closure.len();
        closure.extend(edges.iter().filter(|e| unquantized.contains(e.tensor.as_str())).map(|e| e.owner.clone()));
        if closure.len() == before {
            return closure;
        }
    }
}

/// Every activation tensor that any recipe may quantize, in graph order,
/// each once: what the calibrate stage measures.
pub fn calibration_tensors(graph: &GraphProto) -> Vec<String> {
    let mut seen = HashSet::new();
    [Int8Format::Tensorrt, Int8Format::OnnxruntimeCpu]
        .into_iter()
        .flat_map(|format| edges(graph, format, true))
        .map(|e| e.tensor)
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// What the rewrite did, for the reports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QdqSummary {
    pub format: Option<Int8Format>,
    /// Q/DQ pairs on activations plus DQ nodes on weights and biases.
    pub qdq_pairs: usize,
    pub folded_batch_norms: usize,
    /// Weight channels and activations that were all zero, by name.
    pub dead: Vec<String>,
    /// Residual Adds left with a float shortcut.
    pub float_adds: Vec<String>,
    /// The ops left in float on purpose (`float_layers`), by name.
    pub float_ops: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QdqError {
    #[error("the model has no Conv, Gemm or MatMul node, so there is nothing to quantize")]
    NothingToQuantize,
    #[error("`{op}` is not an op this recipe quantizes, so it cannot be left in float (the sensitivity ranking is from another model?)")]
    UnknownFloatOp { op: String },
    #[error("the model uses opset {found}; per-channel Q/DQ needs opset {MIN_OPSET} or later. Re-export it with opset_version={MIN_OPSET} or higher")]
    OpsetTooOld { found: i64 },
    #[error("no calibration statistics for tensor `{tensor}`; the calibrate stage is older than this build, rerun it")]
    MissingStatistics { tensor: String },
    #[error("tensor `{tensor}` of node `{node}` {problem}")]
    BadTensor { node: String, tensor: String, problem: String },
    #[error("lint failed at node `{node}`: {problem}")]
    Lint { node: String, problem: String },
    #[error(
        "the rewritten graph is malformed at node `{node}`: {problem} (a qsweep bug: please report it with the model)"
    )]
    Malformed { node: String, problem: String },
}

impl From<Malformed> for QdqError {
    fn from(Malformed { node, problem }: Malformed) -> Self {
        QdqError::Malformed { node, problem }
    }
}

/// How one format stores numbers.
struct Encoding {
    /// Largest weight magnitude in int8 steps (127, or 63 for 7-bit).
    weight_levels: f32,
    unsigned_activations: bool,
}

impl Encoding {
    fn of(format: Int8Format) -> Self {
        match format {
            Int8Format::Tensorrt => Encoding { weight_levels: 127.0, unsigned_activations: false },
            Int8Format::OnnxruntimeCpu => Encoding { weight_levels: 63.0, unsigned_activations: true },
        }
    }

    /// Scale and zero point of an activation with this range.
    fn activation(&self, range: Range) -> (f32, u8) {
        match (self.unsigned_activations, range.nonnegative) {
            (true, true) => (scale_of(range.amax, 255.0), 0),
            (true, false) => (scale_of(range.amax, 127.0), 128),
            (false, _) => (scale_of(range.amax, 127.0), 0),
        }
    }
}

/// The largest int8 weight level `format` writes (127, or 63 for 7-bit
/// weights); QAT keeps fine-tuned weights inside it.
pub fn weight_levels(format: Int8Format) -> f32 {
    Encoding::of(format).weight_levels
}

/// Rewrites `model` into a Q/DQ model. `ranges` maps every tensor of
/// `calibration_tensors` to its calibrated range.
pub fn quantize(
    model: &ModelProto,
    ranges: &HashMap<String, Range>,
    format: Int8Format,
    residual_fusion: bool,
) -> Result<(ModelProto, QdqSummary), QdqError> {
    quantize_except(model, ranges, format, residual_fusion, &Fallback::default())
}

/// `quantize`, leaving the ops `fallback` names in float: no Q/DQ on
/// their inputs (and in the `onnxruntime-cpu` format none on their
/// outputs), float weights; in fp16 with Casts around them where asked.
pub fn quantize_except(
    model: &ModelProto,
    ranges: &HashMap<String, Range>,
    format: Int8Format,
    residual_fusion: bool,
    fallback: &Fallback,
) -> Result<(ModelProto, QdqSummary), QdqError> {
    let opset = default_opset(model);
    if opset < MIN_OPSET {
        return Err(QdqError::OpsetTooOld { found: opset });
    }
    let mut model = model.clone();
    let graph = model.graph.as_mut().expect("a loaded model has a graph");
    let known: HashSet<String> = quantized_ops(graph, format, residual_fusion).into_iter().map(|op| op.name).collect();
    if let Some(op) = fallback.ops.iter().find(|op| !known.contains(*op)) {
        return Err(QdqError::UnknownFloatOp { op: op.clone() });
    }
    let float_ops = float_closure(graph, format, residual_fusion, &fallback.ops);
    // Ops are named by `node_name`, which numbers unnamed nodes by their
    // position; the patches below move nodes, so fix the names first.
    name_unnamed_nodes(graph);
    let mut summary =
        QdqSummary { format: Some(format), float_ops: float_ops.iter().cloned().collect(), ..Default::default() };
    inline_constant_identities(graph).apply(graph)?;
    let mut names = Names::of(graph);
    if format == Int8Format::OnnxruntimeCpu {
        // Again until nothing folds: a fold can put a Conv before the next
        // BatchNorm (Conv -> BatchNorm -> BatchNorm).
        loop {
            let (folding, folded) = fold_batch_norms(graph, &mut names)?;
            if folded == 0 {
                break;
            }
            folding.apply(graph)?;
            summary.folded_batch_norms += folded;
        }
    }
    insert_qdq(graph, ranges, format, residual_fusion, &float_ops, &mut names, &mut summary)?.apply(graph)?;
    if fallback.precision == FallbackPrecision::Fp16 && !float_ops.is_empty() {
        in_half_precision(graph, &float_ops, &mut names)?.apply(graph)?;
    }

    let index = GraphIndex::new(graph);
    summary.float_adds = residual_adds(&index)
        .into_iter()
        .filter(|add| index.producer(&add.skip).is_none_or(|p| p.op_type != "DequantizeLinear"))
        .map(|add| add.name)
        .collect();
    lint(&model, residual_fusion, &float_ops)?;
    Ok((model, summary))
}

/// Gives every unnamed node the stand-in name `node_name` reports for it.
fn name_unnamed_nodes(graph: &mut GraphProto) {
    for (index, node) in graph.node.iter_mut().enumerate() {
        if node.name.is_empty() {
            node.name = node_name(node, index);
        }
    }
}

/// The fp16 patch for float weighted ops: constant inputs stored as fp16,
/// runtime inputs cast to fp16, the output cast back to fp32, so the op
/// itself runs in half precision and its neighbours see fp32 as before.
fn in_half_precision(graph: &GraphProto, ops: &BTreeSet<String>, names: &mut Names) -> Result<Patch, QdqError> {
    let index = GraphIndex::new(graph);
    let mut patch = Patch::default();
    for (position, node) in graph.node.iter().enumerate() {
        if !ops.contains(&node.name) || !WEIGHTED_OPS.contains(&node.op_type.as_str()) {
            continue;
        }
        for (slot, tensor) in node.input.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            let half_name = names.fresh(&format!("{tensor}_fp16"));
            match graph.initializer.iter().find(|t| &t.name == tensor) {
                Some(constant) => {
                    let values = float_values(constant).map_err(|problem| QdqError::BadTensor {
                        node: node.name.clone(),
                        tensor: tensor.clone(),
                        problem,
                    })?;
                    let bytes = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
                    patch.add_initializer(raw_tensor(&half_name, &constant.dims, DataType::Float16, bytes));
                }
                None => {
                    let place = index.producer_index(tensor).map_or(Place::First, Place::After);
                    let cast =
                        cast_node(&names.fresh(&format!("{tensor}_Cast_fp16")), tensor, &half_name, DataType::Float16);
                    patch.add_node(place, cast);
                }
            }
            patch.set_input(position, slot, half_name);
        }
        let output = &node.output[0];
        let half_output = names.fresh(&format!("{output}_fp16"));
        patch.set_output(position, 0, half_output.clone());
        let cast = cast_node(&names.fresh(&format!("{output}_Cast_fp32")), &half_output, output, DataType::Float);
        patch.add_node(Place::After(position), cast);
    }
    Ok(patch)
}

fn cast_node(name: &str, input: &str, output: &str, to: DataType) -> NodeProto {
    NodeProto {
        op_type: "Cast".to_string(),
        name: name.to_string(),
        input: vec![input.to_string()],
        output: vec![output.to_string()],
        attribute: vec![AttributeProto {
            name: "to".into(),
            r#type: AttributeType::Int as i32,
            i: to as i64,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The Q/DQ patch: a pair on each activation tensor an edge reads, shared
/// by all its edges and placed right after the tensor's producer; int8
/// weights with one DequantizeLinear each; and on the CPU format, biases
/// as int32 at the product of input and weight scales.
fn insert_qdq(
    graph: &GraphProto,
    ranges: &HashMap<String, Range>,
    format: Int8Format,
    residual_fusion: bool,
    float_ops: &BTreeSet<String>,
    names: &mut Names,
    summary: &mut QdqSummary,
) -> Result<Patch, QdqError> {
    let encoding = Encoding::of(format);
    let mut ops = weighted_ops(&GraphIndex::new(graph));
    if ops.is_empty() {
        return Err(QdqError::NothingToQuantize);
    }
    ops.retain(|op| !float_ops.contains(&op.name));
    let mut patch = Patch::default();
    // `float_ops` is closed (`float_closure`): no op outside it reads a
    // tensor one inside it reads unquantized, so dropping the pairs of
    // those tensors takes no quantized input from anyone.
    let mut edges = edges(graph, format, residual_fusion);
    let unquantized: HashSet<String> =
        edges.iter().filter(|e| !e.output && float_ops.contains(&e.owner)).map(|e| e.tensor.clone()).collect();
    edges.retain(|edge| !float_ops.contains(&edge.owner) && !unquantized.contains(&edge.tensor));
    let mut scales: BTreeMap<String, (f32, u8)> = BTreeMap::new();
    for edge in &edges {
        let &range =
            ranges.get(&edge.tensor).ok_or_else(|| QdqError::MissingStatistics { tensor: edge.tensor.clone() })?;
        if range.amax == 0.0 && !summary.dead.contains(&edge.tensor) {
            summary.dead.push(edge.tensor.clone());
        }
        scales.entry(edge.tensor.clone()).or_insert_with(|| encoding.activation(range));
    }
    let producers: HashMap<String, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
    let mut dequantized: HashMap<String, String> = HashMap::new();
    for (tensor, &(scale, zero_point)) in &scales {
        let zero_point = encoding.unsigned_activations.then_some(zero_point);
        let (nodes, initializers, output) = activation_pair(tensor, scale, zero_point, names);
        initializers.into_iter().for_each(|t| patch.add_initializer(t));
        let place = producers.get(tensor).map_or(Place::First, |&producer| Place::After(producer));
        nodes.into_iter().for_each(|n| patch.add_node(place, n));
        dequantized.insert(tensor.clone(), output);
        summary.qdq_pairs += 1;
    }
    for edge in &edges {
        patch.set_input(edge.node, edge.slot, dequantized[&edge.tensor].clone());
    }

    let mut weights: HashMap<String, String> = HashMap::new();
    for op in &ops {
        let Some(weight) = &op.weight else { continue };
        let Some(original) = graph.initializer.iter().find(|t| t.name == weight.tensor) else { continue };
        let bad =
            |problem: String| QdqError::BadTensor { node: op.name.clone(), tensor: weight.tensor.clone(), problem };
        let (int8, weight_scales, dead) =
            quantize_weight(original, weight.channel_axis, encoding.weight_levels).map_err(bad)?;
        summary.dead.extend(dead.into_iter().map(|c| format!("{}[{c}]", weight.tensor)));
        if !weights.contains_key(&weight.tensor) {
            let (node, initializers, output) =
                weight_dequantize(original, int8, &weight_scales, weight.channel_axis, names);
            initializers.into_iter().for_each(|t| patch.add_initializer(t));
            patch.add_node(Place::First, node);
            weights.insert(weight.tensor.clone(), output);
            summary.qdq_pairs += 1;
        }
        patch.set_input(op.node, weight.slot, weights[&weight.tensor].clone());

        let bias = graph.node[op.node].input.get(2).filter(|b| !b.is_empty());
        let input_scale = op.activations.first().and_then(|(_, t)| {
            scales.get(t).or_else(|| {
                // The pair may sit above a Pad; a Pad keeps the scale.
                let pad = producers.get(t).map(|&p| &graph.node[p]).filter(|p| p.op_type == "Pad")?;
                scales.get(&pad.input[0])
            })
        });
        if let (Int8Format::OnnxruntimeCpu, Some(bias), Some(&(input_scale, _))) = (format, bias, input_scale) {
            let Some(original) = graph.initializer.iter().find(|t| &t.name == bias) else { continue };
            if original.dims.len() != 1 || original.dims[0] as usize != weight_scales.len() {
                continue;
            }
            let bias_scales: Vec<f32> = weight_scales.iter().map(|s| s * input_scale).collect();
            let values = float_values(original).map_err(|problem| QdqError::BadTensor {
                node: op.name.clone(),
                tensor: bias.clone(),
                problem,
            })?;
            let int32: Vec<i32> = values.iter().zip(&bias_scales).map(|(b, s)| (b / s).round() as i32).collect();
            // One per op: a bias shared by several convs (PyTorch shares
            // equal initializers) has a different int32 scale in each.
            let (node, initializers, output) = bias_dequantize(original, &int32, &bias_scales, names);
            initializers.into_iter().for_each(|t| patch.add_initializer(t));
            patch.add_node(Place::First, node);
            summary.qdq_pairs += 1;
            patch.set_input(op.node, 2, output);
        }
    }
    Ok(patch)
}

fn scale_of(amax: f32, levels: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / levels
    } else {
        DEAD_SCALE
    }
}

fn default_opset(model: &ModelProto) -> i64 {
    model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(1, |o| o.version)
}

/// Exporters deduplicate equal initializers behind Identity nodes (two
/// zero BatchNorm biases become one tensor and an Identity). Reading the
/// initializer directly keeps such parameters constant for folding.
fn inline_constant_identities(graph: &GraphProto) -> Patch {
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut patch = Patch::default();
    for (i, node) in graph.node.iter().enumerate() {
        let aliases_constant = node.op_type == "Identity"
            && initializers.contains(node.input[0].as_str())
            && !graph_outputs.contains(node.output[0].as_str());
        if aliases_constant {
            patch.remove_node(i);
            patch.rename_reads(node.output[0].clone(), node.input[0].clone());
        }
    }
    patch
}

/// Folds each BatchNormalization that is the only consumer of a Conv into
/// that Conv's weights and bias. A BatchNorm that cannot be folded (not
/// after a Conv, or its parameters not constants of the conv's width)
/// stays, and the others are folded all the same. Returns the patch and
/// how many it folds.
fn fold_batch_norms(graph: &GraphProto, names: &mut Names) -> Result<(Patch, usize), QdqError> {
    let index = GraphIndex::new(graph);
    let mut patch = Patch::default();
    let mut folded = 0;
    for (bn, bn_node) in graph.node.iter().enumerate() {
        if bn_node.op_type != "BatchNormalization" || bn_node.output.len() != 1 {
            continue;
        }
        let Some(conv) = index.producer_index(&bn_node.input[0]).filter(|&c| graph.node[c].op_type == "Conv") else {
            continue;
        };
        let conv_node = &graph.node[conv];
        let sole_consumer = index.consumers(&conv_node.output[0]).len() == 1;
        let constants = bn_node.input[1..].iter().chain(conv_node.input.get(1)).all(|t| index.is_constant(t));
        if !(sole_consumer && constants) {
            continue;
        }
        let tensor = |name: &str| graph.initializer.iter().find(|t| t.name == name);
        let bad = |tensor: &str, problem: String| QdqError::BadTensor {
            node: node_name(bn_node, bn),
            tensor: tensor.to_string(),
            problem,
        };
        let read = |name: &str| -> Result<Vec<f32>, QdqError> {
            let t = tensor(name).ok_or_else(|| bad(name, "is not an initializer".into()))?;
            float_values(t).map_err(|p| bad(name, p))
        };
        let (gamma, beta, mean, var) =
            (read(&bn_node.input[1])?, read(&bn_node.input[2])?, read(&bn_node.input[3])?, read(&bn_node.input[4])?);
        let epsilon = bn_node.attribute.iter().find(|a| a.name == "epsilon").map_or(1e-5, |a| a.f);
        let weight =
            tensor(&conv_node.input[1]).ok_or_else(|| bad(&conv_node.input[1], "is not an initializer".into()))?;
        let mut w = float_values(weight).map_err(|p| bad(&weight.name, p))?;
        let channels = weight.dims[0] as usize;
        if [gamma.len(), beta.len(), mean.len(), var.len()].iter().any(|&n| n != channels) {
            continue;
        }
        let mut b = match conv_node.input.get(2).filter(|b| !b.is_empty()) {
            Some(name) => read(name)?,
            None => vec![0.0; channels],
        };
        let per_channel = w.len() / channels;
        for c in 0..channels {
            let factor = gamma[c] / (var[c] + epsilon).sqrt();
            w[c * per_channel..(c + 1) * per_channel].iter_mut().for_each(|v| *v *= factor);
            b[c] = (b[c] - mean[c]) * factor + beta[c];
        }
        let (w_name, b_name) = (
            names.fresh(&format!("{}_bn_folded", conv_node.input[1])),
            names.fresh(&format!("{}_bn_folded_bias", conv_node.input[1])),
        );
        patch.add_initializer(float_tensor(&w_name, &weight.dims, &w));
        patch.add_initializer(float_tensor(&b_name, &[channels as i64], &b));
        patch.set_input(conv, 1, w_name);
        patch.set_input(conv, 2, b_name);
        patch.set_output(conv, 0, bn_node.output[0].clone());
        patch.remove_node(bn);
        folded += 1;
    }
    Ok((patch, folded))
}

/// A Quantize/Dequantize pair on `tensor`, its scale and zero point (uint8
/// when `zero_point` is given, int8 zero otherwise), and the name of the
/// dequantized output.
fn activation_pair(
    tensor: &str,
    scale: f32,
    zero_point: Option<u8>,
    names: &mut Names,
) -> (Vec<NodeProto>, Vec<TensorProto>, String) {
    let scale_name = names.fresh(&format!("{tensor}_scale"));
    let zero_name = names.fresh(&format!("{tensor}_zero_point"));
    let quantized = names.fresh(&format!("{tensor}_quantized"));
    let output = names.fresh(&format!("{tensor}_dequantized"));
    let nodes = vec![
        node(
            "QuantizeLinear",
            &names.fresh(&format!("{tensor}_QuantizeLinear")),
            &[tensor, &scale_name, &zero_name],
            &quantized,
            None,
        ),
        node(
            "DequantizeLinear",
            &names.fresh(&format!("{tensor}_DequantizeLinear")),
            &[&quantized, &scale_name, &zero_name],
            &output,
            None,
        ),
    ];
    let zero = match zero_point {
        Some(zero_point) => uint8_tensor(&zero_name, &[], &[zero_point]),
        None => int8_tensor(&zero_name, &[], &[0]),
    };
    (nodes, vec![float_tensor(&scale_name, &[], &[scale]), zero], output)
}

fn weight_dequantize(
    original: &TensorProto,
    int8: Vec<i8>,
    scales: &[f32],
    axis: usize,
    names: &mut Names,
) -> (NodeProto, Vec<TensorProto>, String) {
    let name = &original.name;
    let (int8_name, scale_name, zero_name) = (
        names.fresh(&format!("{name}_int8")),
        names.fresh(&format!("{name}_scale")),
        names.fresh(&format!("{name}_zero_point")),
    );
    let output = names.fresh(&format!("{name}_dequantized"));
    let channels = scales.len() as i64;
    let node = node(
        "DequantizeLinear",
        &names.fresh(&format!("{name}_DequantizeLinear")),
        &[&int8_name, &scale_name, &zero_name],
        &output,
        Some(axis as i64),
    );
    let initializers = vec![
        int8_tensor(&int8_name, &original.dims, &int8),
        float_tensor(&scale_name, &[channels], scales),
        int8_tensor(&zero_name, &[channels], &vec![0; scales.len()]),
    ];
    (node, initializers, output)
}

fn bias_dequantize(
    original: &TensorProto,
    int32: &[i32],
    scales: &[f32],
    names: &mut Names,
) -> (NodeProto, Vec<TensorProto>, String) {
    let name = &original.name;
    let (int32_name, scale_name, zero_name) = (
        names.fresh(&format!("{name}_int32")),
        names.fresh(&format!("{name}_scale")),
        names.fresh(&format!("{name}_zero_point")),
    );
    let output = names.fresh(&format!("{name}_dequantized"));
    let node = node(
        "DequantizeLinear",
        &names.fresh(&format!("{name}_DequantizeLinear")),
        &[&int32_name, &scale_name, &zero_name],
        &output,
        Some(0),
    );
    let n = scales.len() as i64;
    let int32_tensor = |tensor_name: &str, values: &[i32]| {
        raw_tensor(tensor_name, &[n], DataType::Int32, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    };
    let initializers = vec![
        int32_tensor(&int32_name, int32),
        float_tensor(&scale_name, &[n], scales),
        int32_tensor(&zero_name, &vec![0; scales.len()]),
    ];
    (node, initializers, output)
}

/// A weight as int8 values, one scale per channel, and its all-zero channels.
type QuantizedWeight = (Vec<i8>, Vec<f32>, Vec<usize>);

/// Symmetric per-channel int8 by max.
fn quantize_weight(weight: &TensorProto, axis: usize, levels: f32) -> Result<QuantizedWeight, String> {
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
    let scales: Vec<f32> = amax.iter().map(|&a| scale_of(a, levels)).collect();
    let int8 = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[channel_of(i)]).round_ties_even().clamp(-levels, levels) as i8)
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
    if !tensor.raw_data.len().is_multiple_of(4) {
        return Err("has raw data that is not a whole number of floats".into());
    }
    Ok(tensor.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A constant tensor stored as little-endian raw bytes.
fn raw_tensor(name: &str, dims: &[i64], data_type: DataType, raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: data_type as i32,
        raw_data,
        ..Default::default()
    }
}

fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    raw_tensor(name, dims, DataType::Float, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn int8_tensor(name: &str, dims: &[i64], values: &[i8]) -> TensorProto {
    raw_tensor(name, dims, DataType::Int8, values.iter().map(|&v| v as u8).collect())
}

fn uint8_tensor(name: &str, dims: &[i64], values: &[u8]) -> TensorProto {
    raw_tensor(name, dims, DataType::Uint8, values.to_vec())
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

/// Checks a Q/DQ model against what TensorRT's parser and fuser accept,
/// with the residual Adds in `float_ops` left in float on purpose. The
/// first problem found names its node.
pub fn lint(model: &ModelProto, residual_fusion: bool, float_ops: &BTreeSet<String>) -> Result<(), QdqError> {
    let graph = model.graph.as_ref().expect("a model has a graph");
    let index = GraphIndex::new(graph);
    let initializer = |name: &str| graph.initializer.iter().find(|t| t.name == name);
    let fail = |node: &str, problem: String| Err(QdqError::Lint { node: node.to_string(), problem });

    for (i, node) in graph.node.iter().enumerate() {
        let name = node_name(node, i);
        if node.op_type == "QuantizeLinear" || node.op_type == "DequantizeLinear" {
            let axis = int_attribute(node, "axis");
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
                    "Gemm" if int_attribute(node, "transB") == Some(1) => 0,
                    _ => 1,
                };
                let axis = int_attribute(dq, "axis").unwrap_or(1);
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
        if residual_fusion && !dequantized[add.skip_slot] && !float_ops.contains(&add.name) {
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
