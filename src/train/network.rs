//! An ONNX graph as a differentiable candle computation: ONNX in, trained
//! ONNX out, so any CNN a user exports (or a Q/DQ model qsweep wrote) can be
//! trained or fine-tuned.
//!
//! What is trained: float initializers in weight slots (Conv and Gemm
//! weights and biases, a MatMul's constant operand, BatchNorm's scale and
//! bias), and integer initializers behind a DequantizeLinear (a Q/DQ
//! model's int8 weights and int32 biases), which train as float "shadow"
//! values and are fake-quantized on every forward pass with the scale,
//! zero point and range they are exported with. A QuantizeLinear ->
//! DequantizeLinear pair on an activation is fake quantization with its
//! scale; the gradient is the straight-through estimator.
//!
//! BatchNorm has two modes. Training from scratch (`qsweep train`) uses
//! batch statistics and updates the running ones. Fine-tuning (QAT) freezes
//! the statistics: the PTQ amax values were calibrated, and TensorRT folds
//! BatchNorm, with the running statistics, so training against batch
//! statistics would tune a different function from the one deployed. (The
//! `onnxruntime-cpu` Q/DQ format has BatchNorm folded into the convs
//! already, which freezes it the same way.)
//!
//! Dropout is the identity: fine-tuning runs a few epochs at a small
//! learning rate, and the deployed graph has no dropout either.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_onnx::onnx::{attribute_proto::AttributeType, tensor_proto::DataType, ModelProto, NodeProto, TensorProto};

use super::kernels::{Pooling, Quantizer};
use super::ops::{BatchNormTrain, BatchStatistics, ChannelAffine, Conv2d, FakeQuant, Geometry, Pool, Relu};
use super::TrainError;
use crate::onnx::graph::node_name;
use crate::onnx::{numbers_tensor, tensor_numbers};

/// The operators the interpreter runs.
pub const SUPPORTED: &[&str] = &[
    "Conv",
    "BatchNormalization",
    "Relu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Concat",
    "Flatten",
    "Reshape",
    "Gemm",
    "MatMul",
    "Identity",
    "Dropout",
    "QuantizeLinear",
    "DequantizeLinear",
    "Constant",
];

/// How BatchNormalization behaves while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchNorm {
    /// Batch statistics, with the running statistics updated (training from scratch).
    Batch,
    /// The running statistics, frozen (fine-tuning, evaluation).
    Frozen,
}

/// One trainable tensor and how it is stored in the model.
pub struct Parameter {
    /// The initializer it came from and is exported to.
    pub name: String,
    pub var: Var,
    pub storage: Storage,
    /// Weight decay applies to weights, not to biases or BatchNorm.
    pub decays: bool,
}

pub enum Storage {
    Float,
    /// An integer initializer behind a DequantizeLinear: exported by
    /// quantizing again with this quantizer's scale, zero point and range.
    Quantized {
        quantizer: QuantSpec,
        data_type: i32,
    },
}

/// A quantizer as the model states it; the inner size depends on the shape.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantSpec {
    pub scales: Vec<f32>,
    pub zero_points: Vec<f32>,
    pub min: f32,
    pub max: f32,
    pub axis: i64,
}

impl QuantSpec {
    pub fn for_shape(&self, dims: &[usize]) -> Quantizer {
        let axis = if self.axis < 0 { (self.axis + dims.len() as i64) as usize } else { self.axis as usize };
        let inner = if self.scales.len() > 1 { dims[axis + 1..].iter().product() } else { 1 };
        Quantizer {
            scales: self.scales.clone(),
            zero_points: self.zero_points.clone(),
            min: self.min,
            max: self.max,
            inner,
        }
    }
}

/// A value flowing through the graph.
#[derive(Clone)]
enum Value {
    Tensor(Tensor),
    /// A QuantizeLinear's output, which only a DequantizeLinear may read.
    Quantized(Tensor, QuantSpec),
    /// A constant integer tensor (Reshape's shape).
    Ints(Vec<i64>),
}

/// Running statistics of one BatchNormalization, by its mean and variance initializers.
struct RunningStatistics {
    mean_name: String,
    var_name: String,
    mean: Tensor,
    var: Tensor,
}

pub struct Network {
    nodes: Vec<NodeProto>,
    input: String,
    output: String,
    pub parameters: Vec<Parameter>,
    /// Float constants (scales, BatchNorm statistics, constant operands).
    constants: HashMap<String, Value>,
    running: HashMap<String, RunningStatistics>,
    /// Each QuantizeLinear's quantizer, by the node's output.
    activation_quantizers: HashMap<String, QuantSpec>,
    /// BatchNormalization outputs whose only reader is a Relu.
    fused_relu: HashSet<String>,
    pub batch_norm: BatchNorm,
}

/// Slots of each operator that hold trainable float weights.
fn trainable_slots(op: &str) -> &'static [usize] {
    match op {
        "Conv" | "Gemm" => &[1, 2],
        "MatMul" => &[0, 1],
        "BatchNormalization" => &[1, 2],
        _ => &[],
    }
}

impl Network {
    /// Reads `model`, checking every operator before any training starts.
    /// `weight_levels` narrows int8 weights to +-levels (7-bit weights of
    /// the `onnxruntime-cpu` format); `None` keeps the type's range.
    pub fn from_model(
        model: &ModelProto,
        batch_norm: BatchNorm,
        weight_levels: Option<f32>,
    ) -> Result<Self, TrainError> {
        let graph = model.graph.as_ref().ok_or_else(|| TrainError::Model("the model has no graph".into()))?;
        check_operators(model)?;
        let initializers: HashMap<&str, &TensorProto> =
            graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        let inputs: Vec<&str> =
            graph.input.iter().map(|i| i.name.as_str()).filter(|n| !initializers.contains_key(n)).collect();
        let [input] = inputs[..] else {
            return Err(TrainError::Model(format!(
                "training needs a model with one input, this one has {}",
                inputs.len()
            )));
        };
        let output = graph.output.first().ok_or_else(|| TrainError::Model("the model has no output".into()))?;

        let numbers = |t: &TensorProto| tensor_numbers(t).map_err(TrainError::Model);
        let mut weight_slots: HashSet<&str> = HashSet::new();
        let mut dequantized: HashMap<&str, &NodeProto> = HashMap::new();
        for node in &graph.node {
            for &slot in trainable_slots(&node.op_type) {
                if let Some(name) = node.input.get(slot) {
                    weight_slots.insert(name);
                }
            }
            if node.op_type == "DequantizeLinear" {
                dequantized.insert(node.input[0].as_str(), node);
            }
        }

        let mut parameters = Vec::new();
        let mut constants = HashMap::new();
        for tensor in &graph.initializer {
            let name = tensor.name.as_str();
            let dims: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
            let is_float = tensor.data_type == DataType::Float as i32;
            if let (false, Some(node)) = (is_float, dequantized.get(name)) {
                let mut quantizer = quant_spec(node, &initializers)?;
                if let (Some(levels), true) = (weight_levels, tensor.data_type == DataType::Int8 as i32) {
                    (quantizer.min, quantizer.max) = (-levels, levels);
                }
                let per_element = quantizer.for_shape(&dims);
                let shadow: Vec<f32> =
                    numbers(tensor)?.iter().enumerate().map(|(i, &q)| per_element.dequantize(i, q as f32)).collect();
                let var = Var::from_vec(shadow, dims.as_slice(), &Device::Cpu)?;
                let decays = tensor.data_type != DataType::Int32 as i32;
                parameters.push(Parameter {
                    name: name.to_string(),
                    var,
                    storage: Storage::Quantized { quantizer, data_type: tensor.data_type },
                    decays,
                });
            } else if is_float && weight_slots.contains(name) {
                let values: Vec<f32> = numbers(tensor)?.iter().map(|&v| v as f32).collect();
                let var = Var::from_vec(values, dims.as_slice(), &Device::Cpu)?;
                parameters.push(Parameter {
                    name: name.to_string(),
                    var,
                    storage: Storage::Float,
                    decays: dims.len() > 1,
                });
            } else if is_float {
                let values: Vec<f32> = numbers(tensor)?.iter().map(|&v| v as f32).collect();
                constants
                    .insert(name.to_string(), Value::Tensor(Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?));
            } else {
                constants.insert(name.to_string(), Value::Ints(numbers(tensor)?.iter().map(|&v| v as i64).collect()));
            }
        }
        if parameters.is_empty() {
            return Err(TrainError::NothingToTrain);
        }

        let activation_quantizers = graph
            .node
            .iter()
            .filter(|n| n.op_type == "QuantizeLinear")
            .map(|n| Ok((n.output[0].clone(), quant_spec(n, &initializers)?)))
            .collect::<Result<_, TrainError>>()?;
        let mut running = HashMap::new();
        for node in graph.node.iter().filter(|n| n.op_type == "BatchNormalization") {
            let statistic = |slot: usize| match constants.get(&node.input[slot]) {
                Some(Value::Tensor(t)) => Ok(t.clone()),
                _ => Err(TrainError::Model(format!("BatchNormalization {} has no constant statistics", node.name))),
            };
            running.insert(
                node.output[0].clone(),
                RunningStatistics {
                    mean_name: node.input[3].clone(),
                    var_name: node.input[4].clone(),
                    mean: statistic(3)?,
                    var: statistic(4)?,
                },
            );
        }
        Ok(Self {
            nodes: graph.node.clone(),
            input: input.to_string(),
            output: output.name.clone(),
            parameters,
            constants,
            running,
            activation_quantizers,
            fused_relu: batch_norms_before_relu(graph),
            batch_norm,
        })
    }

    /// The logits for a batch; `training` selects BatchNorm's batch mode
    /// (when the network was made for it) and updates running statistics.
    pub fn forward(&mut self, input: &Tensor, training: bool) -> Result<Tensor, TrainError> {
        let mut values: HashMap<String, Value> = self.constants.clone();
        for parameter in &self.parameters {
            let tensor = parameter.var.as_tensor().clone();
            let value = match &parameter.storage {
                Storage::Float => Value::Tensor(tensor),
                // The DequantizeLinear reading it fake-quantizes it.
                Storage::Quantized { quantizer, .. } => Value::Quantized(tensor, quantizer.clone()),
            };
            values.insert(parameter.name.clone(), value);
        }
        values.insert(self.input.clone(), Value::Tensor(input.clone()));
        let batch_statistics = training && self.batch_norm == BatchNorm::Batch;
        let measured = std::cell::RefCell::new(Vec::new());
        for (i, node) in self.nodes.iter().enumerate() {
            let run = || -> Result<Value, TrainError> {
                let tensor = |slot: usize| -> Result<Tensor, TrainError> {
                    match node.input.get(slot).and_then(|name| values.get(name)) {
                        Some(Value::Tensor(t)) => Ok(t.clone()),
                        Some(Value::Ints(v)) => {
                            Ok(Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), v.len(), &Device::Cpu)?)
                        }
                        Some(Value::Quantized(..)) => Err(TrainError::Model(format!(
                            "node {} reads a QuantizeLinear output directly; only a DequantizeLinear may",
                            node_name(node, i)
                        ))),
                        None => Err(TrainError::Model(format!(
                            "node {} reads {:?}, which nothing produced",
                            node_name(node, i),
                            node.input.get(slot)
                        ))),
                    }
                };
                let context = Context {
                    values: &values,
                    quantizers: &self.activation_quantizers,
                    batch_statistics: batch_statistics.then_some(&measured),
                    fused_relu: &self.fused_relu,
                };
                evaluate(node, i, &tensor, &context)
            };
            let value = run()?;
            values.insert(node.output[0].clone(), value);
        }
        for measurement in measured.into_inner() {
            self.update_running(measurement)?;
        }
        match values.remove(&self.output) {
            Some(Value::Tensor(t)) => Ok(t),
            _ => Err(TrainError::Model(format!("the output {} was not computed", self.output))),
        }
    }

    /// Folds one BatchNormalization's batch statistics into its running ones.
    fn update_running(&mut self, measured: Measured) -> Result<(), TrainError> {
        let statistics =
            self.running.get_mut(&measured.output).expect("every BatchNormalization has running statistics");
        let Some((mean, var)) = measured.statistics.lock().expect("statistics lock").take() else {
            return Ok(());
        };
        let (channels, count, momentum) = (mean.len(), measured.count as f64, measured.momentum);
        let mean = Tensor::from_vec(mean, channels, &Device::Cpu)?;
        let unbiased = (Tensor::from_vec(var, channels, &Device::Cpu)? * (count / (count - 1.0).max(1.0)))?;
        statistics.mean = ((&statistics.mean * momentum)? + (mean * (1.0 - momentum))?)?;
        statistics.var = ((&statistics.var * momentum)? + (unbiased * (1.0 - momentum))?)?;
        self.constants.insert(statistics.mean_name.clone(), Value::Tensor(statistics.mean.clone()));
        self.constants.insert(statistics.var_name.clone(), Value::Tensor(statistics.var.clone()));
        Ok(())
    }

    /// Named tensors that, with the parameters, make the training state:
    /// the running statistics.
    pub fn running_statistics(&self) -> Vec<(String, Tensor)> {
        self.running
            .values()
            .flat_map(|s| [(s.mean_name.clone(), s.mean.clone()), (s.var_name.clone(), s.var.clone())])
            .collect()
    }

    pub fn set_running_statistic(&mut self, name: &str, value: Tensor) {
        for statistics in self.running.values_mut() {
            if statistics.mean_name == name {
                statistics.mean = value.clone();
            }
            if statistics.var_name == name {
                statistics.var = value.clone();
            }
        }
        self.constants.insert(name.to_string(), Value::Tensor(value));
    }

    /// `model` with the trained values in place of the initializers they came from.
    pub fn export(&self, model: &ModelProto) -> Result<ModelProto, TrainError> {
        let mut model = model.clone();
        let graph = model.graph.as_mut().expect("read by from_model");
        let mut replacements: HashMap<String, TensorProto> = HashMap::new();
        for parameter in &self.parameters {
            let tensor = parameter.var.as_tensor();
            let dims: Vec<i64> = tensor.dims().iter().map(|&d| d as i64).collect();
            let values: Vec<f32> = tensor.flatten_all()?.to_vec1()?;
            let (data_type, numbers): (i32, Vec<f64>) = match &parameter.storage {
                Storage::Float => (DataType::Float as i32, values.iter().map(|&v| v as f64).collect()),
                Storage::Quantized { quantizer, data_type } => {
                    let quantizer = quantizer.for_shape(tensor.dims());
                    let levels = values
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| quantizer.level(i, v).clamp(quantizer.min, quantizer.max) as f64);
                    (*data_type, levels.collect())
                }
            };
            replacements.insert(parameter.name.clone(), numbers_tensor(&parameter.name, &dims, data_type, &numbers));
        }
        for (name, tensor) in self.running_statistics() {
            let dims: Vec<i64> = tensor.dims().iter().map(|&d| d as i64).collect();
            let values: Vec<f64> = tensor.flatten_all()?.to_vec1::<f32>()?.iter().map(|&v| v as f64).collect();
            replacements.insert(name.clone(), numbers_tensor(&name, &dims, DataType::Float as i32, &values));
        }
        for initializer in &mut graph.initializer {
            if let Some(replacement) = replacements.remove(&initializer.name) {
                *initializer = replacement;
            }
        }
        Ok(model)
    }
}

fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a candle_onnx::onnx::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attribute_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attribute(node, name).filter(|a| a.r#type == AttributeType::Int as i32).map_or(default, |a| a.i)
}

fn attribute_f(node: &NodeProto, name: &str, default: f64) -> f64 {
    attribute(node, name).filter(|a| a.r#type == AttributeType::Float as i32).map_or(default, |a| a.f as f64)
}

fn attribute_ints(node: &NodeProto, name: &str) -> Option<Vec<usize>> {
    attribute(node, name)
        .filter(|a| a.r#type == AttributeType::Ints as i32)
        .map(|a| a.ints.iter().map(|&v| v as usize).collect())
}

/// BatchNormalization outputs that exactly one node reads, a Relu, and
/// that are not graph outputs.
fn batch_norms_before_relu(graph: &candle_onnx::onnx::GraphProto) -> HashSet<String> {
    let mut readers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for node in &graph.node {
        for input in &node.input {
            readers.entry(input.as_str()).or_default().push(node);
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "BatchNormalization" && !outputs.contains(n.output[0].as_str()))
        .filter(
            |n| matches!(readers.get(n.output[0].as_str()).map(Vec::as_slice), Some([only]) if only.op_type == "Relu"),
        )
        .map(|n| n.output[0].clone())
        .collect()
}

/// Refuses, before training, what the interpreter cannot run, naming the
/// first node it cannot.
pub fn check_operators(model: &ModelProto) -> Result<(), TrainError> {
    let nodes = model.graph.as_ref().map(|g| g.node.as_slice()).unwrap_or_default();
    nodes.iter().enumerate().try_for_each(|(i, node)| check_supported(node, i))
}

fn check_supported(node: &NodeProto, index: usize) -> Result<(), TrainError> {
    let unsupported = |what: String| TrainError::Unsupported { node: node_name(node, index), what };
    if !SUPPORTED.contains(&node.op_type.as_str()) {
        return Err(unsupported(format!("operator {}", node.op_type)));
    }
    if !node.domain.is_empty() && node.domain != "ai.onnx" {
        return Err(unsupported(format!("operator {} of domain {}", node.op_type, node.domain)));
    }
    if node.op_type == "Conv" && attribute_i(node, "group", 1) != 1 {
        return Err(unsupported(format!("Conv with group {}", attribute_i(node, "group", 1))));
    }
    if matches!(node.op_type.as_str(), "Conv" | "MaxPool" | "AveragePool") {
        let auto_pad = attribute(node, "auto_pad").map(|a| String::from_utf8_lossy(&a.s).to_string());
        if auto_pad.as_deref().is_some_and(|p| p != "NOTSET") {
            return Err(unsupported(format!("{} with auto_pad {}", node.op_type, auto_pad.unwrap_or_default())));
        }
        if attribute_ints(node, "kernel_shape").is_some_and(|k| k.len() != 2) {
            return Err(unsupported(format!("{} that is not 2-D", node.op_type)));
        }
    }
    if node.op_type == "MaxPool" && node.output.len() > 1 {
        return Err(unsupported("MaxPool with an Indices output".into()));
    }
    Ok(())
}

fn geometry(node: &NodeProto, kernel: [usize; 2]) -> Geometry {
    let pair = |name: &str, default: usize| {
        attribute_ints(node, name).map_or([default; 2], |v| [v[0], v.get(1).copied().unwrap_or(v[0])])
    };
    let pads = attribute_ints(node, "pads").map_or([0; 4], |p| [p[0], p[1], p[2], p[3]]);
    Geometry {
        kernel,
        stride: pair("strides", 1),
        pads,
        dilation: pair("dilations", 1),
        ceil: attribute_i(node, "ceil_mode", 0) == 1,
    }
}

/// The quantizer of a QuantizeLinear or DequantizeLinear node.
fn quant_spec(node: &NodeProto, initializers: &HashMap<&str, &TensorProto>) -> Result<QuantSpec, TrainError> {
    let constant =
        |slot: usize| node.input.get(slot).filter(|n| !n.is_empty()).and_then(|n| initializers.get(n.as_str()));
    let scale = constant(1)
        .ok_or_else(|| TrainError::Model(format!("{} {} has no constant scale", node.op_type, node.name)))?;
    let scales: Vec<f32> = tensor_numbers(scale).map_err(TrainError::Model)?.iter().map(|&v| v as f32).collect();
    let (zero_points, data_type) = match constant(2) {
        Some(zero) => (tensor_numbers(zero).map_err(TrainError::Model)?, zero.data_type),
        None => (vec![0.0; scales.len()], DataType::Uint8 as i32),
    };
    let (min, max) = match DataType::try_from(data_type) {
        Ok(DataType::Int8) => (-128.0, 127.0),
        Ok(DataType::Uint8) => (0.0, 255.0),
        Ok(DataType::Int32) => (i32::MIN as f32, i32::MAX as f32),
        _ => {
            return Err(TrainError::Model(format!("{} {} has an unsupported zero-point type", node.op_type, node.name)))
        }
    };
    Ok(QuantSpec {
        zero_points: zero_points.iter().map(|&z| z as f32).collect(),
        scales,
        min,
        max,
        axis: attribute_i(node, "axis", 1),
    })
}

/// What a node's evaluation may look at besides its inputs.
struct Context<'a> {
    values: &'a HashMap<String, Value>,
    quantizers: &'a HashMap<String, QuantSpec>,
    /// In BatchNorm's batch mode, where each BatchNormalization leaves the
    /// statistics it measured, for the running ones.
    batch_statistics: Option<&'a std::cell::RefCell<Vec<Measured>>>,
    /// BatchNormalization outputs read only by a Relu, which the
    /// BatchNormalization applies itself: one pass each way instead of three.
    fused_relu: &'a HashSet<String>,
}

/// A BatchNormalization's batch statistics from one forward pass.
struct Measured {
    output: String,
    statistics: BatchStatistics,
    momentum: f64,
    /// Values per channel (batch x height x width).
    count: usize,
}

fn evaluate(
    node: &NodeProto,
    index: usize,
    tensor: &dyn Fn(usize) -> Result<Tensor, TrainError>,
    context: &Context<'_>,
) -> Result<Value, TrainError> {
    let values = context.values;
    let out = |t: Tensor| Ok(Value::Tensor(t));
    let has = |slot: usize| node.input.get(slot).is_some_and(|n| !n.is_empty());
    match node.op_type.as_str() {
        "Conv" => {
            let weight = tensor(1)?;
            let kernel = [weight.dim(2)?, weight.dim(3)?];
            let y = tensor(0)?.contiguous()?.apply_op2(&weight.contiguous()?, Conv2d(geometry(node, kernel)))?;
            if has(2) {
                let bias = tensor(2)?.contiguous()?;
                out(y.apply_op3(&bias.ones_like()?, &bias, ChannelAffine { relu: false })?)
            } else {
                out(y)
            }
        }
        "BatchNormalization" => {
            let (x, scale, bias) = (tensor(0)?.contiguous()?, tensor(1)?.contiguous()?, tensor(2)?.contiguous()?);
            let epsilon = attribute_f(node, "epsilon", 1e-5);
            let relu = context.fused_relu.contains(&node.output[0]);
            if let Some(measured) = context.batch_statistics {
                let statistics = BatchStatistics::default();
                let count = x.elem_count() / x.dim(1)?;
                let momentum = attribute_f(node, "momentum", 0.9);
                let output = node.output[0].clone();
                measured.borrow_mut().push(Measured { output, statistics: statistics.clone(), momentum, count });
                let op = BatchNormTrain { epsilon: epsilon as f32, statistics, relu };
                return out(x.apply_op3(&scale, &bias, op)?);
            }
            let multiplier = (&scale / (tensor(4)? + epsilon)?.sqrt()?)?;
            let shift = (bias - (tensor(3)? * &multiplier)?)?;
            out(x.apply_op3(&multiplier.contiguous()?, &shift.contiguous()?, ChannelAffine { relu })?)
        }
        // The BatchNormalization before it applied it already.
        "Relu" if context.fused_relu.contains(&node.input[0]) => out(tensor(0)?),
        "Relu" => out(tensor(0)?.contiguous()?.apply_op1(Relu)?),
        "Clip" => {
            let bound = |slot: usize, attr: &str, default: f32| -> Result<f32, TrainError> {
                if has(slot) {
                    Ok(tensor(slot)?.flatten_all()?.to_vec1::<f32>()?[0])
                } else {
                    Ok(attribute_f(node, attr, default as f64) as f32)
                }
            };
            out(tensor(0)?.clamp(bound(1, "min", f32::MIN)?, bound(2, "max", f32::MAX)?)?)
        }
        "MaxPool" | "AveragePool" => {
            let kernel = attribute_ints(node, "kernel_shape")
                .ok_or_else(|| TrainError::Model(format!("{} has no kernel_shape", node.name)))?;
            let pooling = if node.op_type == "MaxPool" {
                Pooling::Max
            } else {
                Pooling::Average { count_include_pad: attribute_i(node, "count_include_pad", 0) == 1 }
            };
            out(tensor(0)?.contiguous()?.apply_op1(Pool(geometry(node, [kernel[0], kernel[1]]), pooling))?)
        }
        "GlobalAveragePool" => out(tensor(0)?.mean_keepdim(3)?.mean_keepdim(2)?),
        "Add" => out(tensor(0)?.broadcast_add(&tensor(1)?)?),
        "Sub" => out(tensor(0)?.broadcast_sub(&tensor(1)?)?),
        "Mul" => out(tensor(0)?.broadcast_mul(&tensor(1)?)?),
        "Div" => out(tensor(0)?.broadcast_div(&tensor(1)?)?),
        "Concat" => {
            let parts: Vec<Tensor> = (0..node.input.len()).map(tensor).collect::<Result<_, _>>()?;
            let rank = parts[0].rank() as i64;
            let axis = attribute_i(node, "axis", 0);
            out(Tensor::cat(&parts, (if axis < 0 { axis + rank } else { axis }) as usize)?)
        }
        "Flatten" => {
            let x = tensor(0)?;
            let axis = attribute_i(node, "axis", 1);
            let axis = (if axis < 0 { axis + x.rank() as i64 } else { axis }) as usize;
            let outer: usize = x.dims()[..axis].iter().product();
            out(x.reshape((outer, ()))?)
        }
        "Reshape" => {
            let x = tensor(0)?;
            let Some(Value::Ints(shape)) = values.get(&node.input[1]) else {
                return Err(TrainError::Unsupported {
                    node: node_name(node, index),
                    what: "Reshape to a computed shape".into(),
                });
            };
            let mut dims: Vec<usize> =
                shape.iter().enumerate().map(|(i, &d)| if d == 0 { x.dims()[i] } else { d.max(1) as usize }).collect();
            if let Some(free) = shape.iter().position(|&d| d == -1) {
                let known: usize = dims.iter().enumerate().filter(|(i, _)| *i != free).map(|(_, d)| d).product();
                dims[free] = x.elem_count() / known.max(1);
            }
            out(x.reshape(dims)?)
        }
        "Gemm" => {
            let (mut a, mut b) = (tensor(0)?, tensor(1)?);
            if attribute_i(node, "transA", 0) == 1 {
                a = a.t()?;
            }
            if attribute_i(node, "transB", 0) == 1 {
                b = b.t()?;
            }
            let mut y = (a.matmul(&b)? * attribute_f(node, "alpha", 1.0))?;
            if has(2) {
                y = y.broadcast_add(&(tensor(2)? * attribute_f(node, "beta", 1.0))?)?;
            }
            out(y)
        }
        "MatMul" => out(tensor(0)?.broadcast_matmul(&tensor(1)?)?),
        "Identity" | "Dropout" => out(tensor(0)?),
        "Constant" => {
            let value = attribute(node, "value").and_then(|a| a.t.as_ref()).ok_or_else(|| TrainError::Unsupported {
                node: node_name(node, index),
                what: "Constant without a tensor value".into(),
            })?;
            let numbers = tensor_numbers(value).map_err(TrainError::Model)?;
            if value.data_type == DataType::Float as i32 {
                let dims: Vec<usize> = value.dims.iter().map(|&d| d as usize).collect();
                out(Tensor::from_vec(numbers.iter().map(|&v| v as f32).collect(), dims, &Device::Cpu)?)
            } else {
                Ok(Value::Ints(numbers.iter().map(|&v| v as i64).collect()))
            }
        }
        "QuantizeLinear" => Ok(Value::Quantized(tensor(0)?, context.quantizers[&node.output[0]].clone())),
        "DequantizeLinear" => match values.get(&node.input[0]) {
            Some(Value::Quantized(x, quantizer)) => {
                let x = x.contiguous()?;
                let quantizer = quantizer.for_shape(x.dims());
                out(x.apply_op1(FakeQuant(quantizer))?)
            }
            _ => Err(TrainError::Unsupported {
                node: node_name(node, index),
                what: "DequantizeLinear of something other than a QuantizeLinear or a quantized initializer".into(),
            }),
        },
        other => Err(TrainError::Unsupported { node: node_name(node, index), what: format!("operator {other}") }),
    }
}

/// Top-1 predictions of logits [N, classes].
pub fn predictions(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ops::tests::check_gradient;
    use candle_onnx::onnx::AttributeProto;

    fn node(op: &str, inputs: usize, attributes: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: op.into(),
            input: (0..inputs).map(|i| format!("in{i}")).collect(),
            output: vec!["out".into()],
            attribute: attributes,
            ..Default::default()
        }
    }

    fn int(name: &str, value: i64) -> AttributeProto {
        AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: value, ..Default::default() }
    }

    fn float(name: &str, value: f32) -> AttributeProto {
        AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f: value, ..Default::default() }
    }

    fn input(shape: &[usize], seed: usize) -> Tensor {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|i| (((i + seed) * 7919) % 1009) as f32 / 250.0 - 2.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Checks one operator's gradient, through the interpreter, against
    /// finite differences for each of its inputs.
    fn check(node: NodeProto, inputs: &[Tensor], constants: HashMap<String, Value>) {
        check_gradient(inputs, |tensors| {
            let tensor = |slot: usize| Ok(tensors[slot].clone());
            let context = Context {
                values: &constants,
                quantizers: &HashMap::new(),
                batch_statistics: None,
                fused_relu: &HashSet::new(),
            };
            match evaluate(&node, 0, &tensor, &context) {
                Ok(Value::Tensor(t)) => Ok(t),
                Ok(_) => candle_core::bail!("not a tensor"),
                Err(e) => candle_core::bail!("{e}"),
            }
        });
    }

    #[test]
    fn every_candle_backed_operator_has_the_right_gradient() {
        let none = HashMap::new;
        let (a, b) = (input(&[2, 3, 2, 2], 1), input(&[2, 3, 2, 2], 2));
        for op in ["Add", "Sub", "Mul"] {
            check(node(op, 2, vec![]), &[a.clone(), b.clone()], none());
        }
        let positive = (input(&[2, 3, 2, 2], 3).abs().unwrap() + 1.0).unwrap();
        check(node("Div", 2, vec![]), &[a.clone(), positive], none());
        // Broadcasting, as a per-channel bias or scale is written.
        check(node("Add", 2, vec![]), &[a.clone(), input(&[1, 3, 1, 1], 4)], none());
        check(node("Relu", 1, vec![]), &[a.clone()], none());
        check(node("Clip", 1, vec![float("min", -0.5), float("max", 0.7)]), &[a.clone()], none());
        check(node("Concat", 2, vec![int("axis", 1)]), &[a.clone(), b.clone()], none());
        check(node("Flatten", 1, vec![int("axis", 1)]), &[a.clone()], none());
        check(node("GlobalAveragePool", 1, vec![]), &[a.clone()], none());
        check(node("Identity", 1, vec![]), &[a.clone()], none());
        check(node("Dropout", 1, vec![]), &[a.clone()], none());
        let mut reshape = node("Reshape", 2, vec![]);
        reshape.input[1] = "shape".into();
        let shape = HashMap::from([("shape".to_string(), Value::Ints(vec![0, -1]))]);
        check(reshape, &[a.clone()], shape);
        let gemm = node("Gemm", 3, vec![int("transB", 1), float("alpha", 0.5), float("beta", 2.0)]);
        check(gemm, &[input(&[4, 6], 5), input(&[3, 6], 6), input(&[3], 7)], none());
        check(node("MatMul", 2, vec![]), &[input(&[4, 6], 8), input(&[6, 3], 9)], none());
        // Frozen BatchNorm: scale and bias train, the statistics do not.
        let batch_norm = node("BatchNormalization", 5, vec![]);
        let stats = [input(&[3], 10), (input(&[3], 11).abs().unwrap() + 0.5).unwrap()];
        let mut frozen = batch_norm.clone();
        frozen.input[3] = "mean".into();
        frozen.input[4] = "var".into();
        let constants = HashMap::from([
            ("mean".to_string(), Value::Tensor(stats[0].clone())),
            ("var".to_string(), Value::Tensor(stats[1].clone())),
        ]);
        check_gradient(&[a.clone(), input(&[3], 12), input(&[3], 13)], |t| {
            let all = [t[0].clone(), t[1].clone(), t[2].clone(), stats[0].clone(), stats[1].clone()];
            let tensor = |slot: usize| Ok(all[slot].clone());
            let context = Context {
                values: &constants,
                quantizers: &HashMap::new(),
                batch_statistics: None,
                fused_relu: &HashSet::new(),
            };
            match evaluate(&frozen, 0, &tensor, &context) {
                Ok(Value::Tensor(t)) => Ok(t),
                _ => candle_core::bail!("BatchNormalization failed"),
            }
        });
    }

    /// A BatchNormalization that applies its Relu itself computes what the
    /// two nodes compute apart, in both modes, and trains the same.
    #[test]
    fn batch_norm_with_its_relu_fused_matches_them_apart() {
        let constant = |name: &str, values: Vec<f32>| {
            crate::onnx::numbers_tensor(
                name,
                &[values.len() as i64],
                1,
                &values.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            )
        };
        let info = |name: &str| candle_onnx::onnx::ValueInfoProto { name: name.into(), ..Default::default() };
        let mut bn = node("BatchNormalization", 5, vec![]);
        bn.input = vec!["x".into(), "gamma".into(), "beta".into(), "mean".into(), "var".into()];
        bn.output = vec!["normalized".into()];
        let mut relu = node("Relu", 1, vec![]);
        relu.input = vec!["normalized".into()];
        relu.output = vec!["y".into()];
        let graph = |outputs: &[&str]| candle_onnx::onnx::GraphProto {
            node: vec![bn.clone(), relu.clone()],
            initializer: vec![
                constant("gamma", vec![1.5, 0.5]),
                constant("beta", vec![0.2, -0.3]),
                constant("mean", vec![0.1, -0.1]),
                constant("var", vec![2.0, 0.5]),
            ],
            input: vec![info("x")],
            output: outputs.iter().map(|o| info(o)).collect(),
            ..Default::default()
        };
        let fused = ModelProto { graph: Some(graph(&["y"])), ..Default::default() };
        let apart = ModelProto { graph: Some(graph(&["y", "normalized"])), ..Default::default() };
        let x = input(&[2, 2, 3, 3], 5);
        for mode in [BatchNorm::Frozen, BatchNorm::Batch] {
            let mut a = Network::from_model(&fused, mode, None).unwrap();
            let mut b = Network::from_model(&apart, mode, None).unwrap();
            assert_eq!(a.fused_relu.len(), 1);
            assert!(b.fused_relu.is_empty());
            let (ya, yb) = (a.forward(&x, true).unwrap(), b.forward(&x, true).unwrap());
            let difference = (&ya - &yb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(difference < 1e-6, "{mode:?}: {difference}");
            let (ga, gb) = (ya.sum_all().unwrap().backward().unwrap(), yb.sum_all().unwrap().backward().unwrap());
            for (pa, pb) in a.parameters.iter().zip(&b.parameters) {
                let gap = (ga.get(pa.var.as_tensor()).unwrap() - gb.get(pb.var.as_tensor()).unwrap()).unwrap();
                assert!(
                    gap.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5,
                    "{mode:?} {}",
                    pa.name
                );
            }
        }
    }
}
