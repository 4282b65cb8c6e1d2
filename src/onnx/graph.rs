//! Questions about a graph's structure: who produces and consumes each
//! tensor, which ops carry weights, and which Adds are residual joins.
//!
//! Residual Adds are found by shape of the dataflow, not by node names, so
//! they are found in any exporter's output: BatchNorm kept or folded,
//! identity or downsample shortcuts, inputs in either order.

use std::collections::{HashMap, HashSet};

use candle_onnx::onnx::{attribute_proto::AttributeType, GraphProto, NodeProto};

/// Lookups over one graph, built once.
pub struct GraphIndex<'g> {
    pub graph: &'g GraphProto,
    producer: HashMap<&'g str, usize>,
    consumers: HashMap<&'g str, Vec<(usize, usize)>>,
    constants: HashSet<&'g str>,
}

impl<'g> GraphIndex<'g> {
    pub fn new(graph: &'g GraphProto) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        let mut constants: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        for (index, node) in graph.node.iter().enumerate() {
            for (slot, input) in node.input.iter().enumerate() {
                consumers.entry(input.as_str()).or_default().push((index, slot));
            }
            for output in &node.output {
                producer.insert(output.as_str(), index);
                if node.op_type == "Constant" {
                    constants.insert(output.as_str());
                }
            }
        }
        Self { graph, producer, consumers, constants }
    }

    pub fn producer(&self, tensor: &str) -> Option<&'g NodeProto> {
        self.producer_index(tensor).map(|i| &self.graph.node[i])
    }

    pub fn producer_index(&self, tensor: &str) -> Option<usize> {
        self.producer.get(tensor).copied()
    }

    /// The (node, input slot) pairs that read `tensor`.
    pub fn consumers(&self, tensor: &str) -> Vec<(usize, usize)> {
        self.consumers.get(tensor).cloned().unwrap_or_default()
    }

    /// Initializers and Constant outputs: values fixed at export.
    pub fn is_constant(&self, tensor: &str) -> bool {
        self.constants.contains(tensor)
    }
}

/// An op whose inputs TensorRT quantizes: Conv, Gemm or MatMul.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedOp {
    pub node: usize,
    pub name: String,
    pub op_type: String,
    /// Runtime inputs to quantize per tensor, with their input slot.
    pub activations: Vec<(usize, String)>,
    /// The constant weight, quantized per output channel.
    pub weight: Option<Weight>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weight {
    pub slot: usize,
    pub tensor: String,
    /// The axis of the weight that indexes output channels.
    pub channel_axis: usize,
}

pub const WEIGHTED_OPS: [&str; 3] = ["Conv", "Gemm", "MatMul"];

pub fn weighted_ops(index: &GraphIndex<'_>) -> Vec<WeightedOp> {
    let mut ops = Vec::new();
    for (node_index, node) in index.graph.node.iter().enumerate() {
        if !WEIGHTED_OPS.contains(&node.op_type.as_str()) {
            continue;
        }
        let mut activations = Vec::new();
        let mut weight = None;
        // Conv and Gemm: input 0 is data, input 1 the weight. MatMul: either
        // may be a weight; Gemm's C and Conv's bias stay in float.
        for (slot, tensor) in node.input.iter().enumerate().take(2) {
            if tensor.is_empty() {
                continue;
            }
            if index.is_constant(tensor) && slot == 1 {
                let channel_axis = match node.op_type.as_str() {
                    "Conv" => 0,
                    "Gemm" if int_attribute(node, "transB") == Some(1) => 0,
                    _ => 1,
                };
                weight = Some(Weight { slot, tensor: tensor.clone(), channel_axis });
            } else if !index.is_constant(tensor) {
                activations.push((slot, tensor.clone()));
            }
        }
        ops.push(WeightedOp {
            node: node_index,
            name: node_name(node, node_index),
            op_type: node.op_type.clone(),
            activations,
            weight,
        });
    }
    ops
}

/// An Add that joins a block's main branch with its shortcut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidualAdd {
    pub node: usize,
    pub name: String,
    /// Which input (0 or 1) is the shortcut, and its tensor.
    pub skip_slot: usize,
    pub skip: String,
}

/// Adds of two runtime tensors that fork from a common tensor, where the
/// branches hold different numbers of weighted ops: the branch with fewer
/// (none for an identity shortcut, one for a downsample) is the shortcut.
pub fn residual_adds(index: &GraphIndex<'_>) -> Vec<ResidualAdd> {
    let mut adds = Vec::new();
    for (node_index, node) in index.graph.node.iter().enumerate() {
        if node.op_type != "Add" || node.input.len() != 2 || node.input.iter().any(|t| index.is_constant(t)) {
            continue;
        }
        let (a, b) = (ancestry(index, &node.input[0]), ancestry(index, &node.input[1]));
        let Some((ops_a, ops_b)) = a
            .iter()
            .find_map(|(tensor, ops_a)| b.iter().find(|(other, _)| other == tensor).map(|(_, ops_b)| (*ops_a, *ops_b)))
        else {
            continue;
        };
        if ops_a == ops_b {
            continue;
        }
        let skip_slot = if ops_a < ops_b { 0 } else { 1 };
        adds.push(ResidualAdd {
            node: node_index,
            name: node_name(node, node_index),
            skip_slot,
            skip: node.input[skip_slot].clone(),
        });
    }
    adds
}

/// The tensors upstream of `tensor` along first inputs, each with the
/// number of weighted ops between it and `tensor`.
fn ancestry<'g>(index: &GraphIndex<'g>, tensor: &'g str) -> Vec<(&'g str, usize)> {
    const LIMIT: usize = 256;
    let mut out = vec![(tensor, 0)];
    let mut current = tensor;
    let mut weighted = 0;
    while let Some(node) = index.producer(current) {
        if WEIGHTED_OPS.contains(&node.op_type.as_str()) {
            weighted += 1;
        }
        let Some(next) = node.input.first().filter(|t| !t.is_empty() && !index.is_constant(t)) else {
            break;
        };
        current = next;
        out.push((current, weighted));
        if out.len() > LIMIT {
            break;
        }
    }
    out
}

pub fn int_attribute(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name && a.r#type == AttributeType::Int as i32).map(|a| a.i)
}

/// A node's name, or a stable stand-in for unnamed nodes.
pub fn node_name(node: &NodeProto, index: usize) -> String {
    if node.name.is_empty() {
        format!("{}#{index}", node.op_type)
    } else {
        node.name.clone()
    }
}
