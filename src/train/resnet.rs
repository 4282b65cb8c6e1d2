//! The ResNets `qsweep train` starts from, written as ONNX: the CIFAR-style
//! family (He et al. 2016, section 4.2) for small images. A stem 3x3 conv,
//! then three stages of `(depth - 2) / 6` basic blocks at `width`, 2x and 4x
//! channels (the later two stages start with a stride-2 block whose
//! shortcut is a 1x1 conv), global average pooling, and a linear head.
//! Every block is conv-bn-relu-conv-bn, Add with the shortcut, relu, so
//! residual fusion has identity and downsample shortcuts to work on.
//! depth 8, 20 and 32 give resnet-8/20/32; 28x28 and 32x32 inputs both work.

use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_shape_proto::dimension::Value as DimValue, tensor_shape_proto::Dimension,
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};
use rand::{Rng, SeedableRng};

use crate::onnx::numbers_tensor;

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    /// 6n + 2: 8, 14, 20, 32, ...
    pub depth: usize,
    /// Channels of the first stage.
    pub width: usize,
    pub channels: usize,
    pub height: usize,
    pub width_px: usize,
    pub classes: usize,
}

impl Architecture {
    pub fn check(&self) -> Result<(), String> {
        if self.depth < 8 || (self.depth - 2) % 6 != 0 {
            return Err(format!("depth {} is not 6n + 2 (8, 14, 20, 32, ...)", self.depth));
        }
        if !(1..=512).contains(&self.width) {
            return Err(format!("width {} is outside 1 to 512", self.width));
        }
        Ok(())
    }
}

struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    rng: rand_chacha::ChaCha8Rng,
}

impl Builder {
    /// A standard normal draw (Box-Muller).
    fn standard_normal(&mut self) -> f64 {
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let v: f64 = self.rng.random();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn node(&mut self, op: &str, inputs: &[&str], output: &str, attributes: Vec<AttributeProto>) -> String {
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: format!("{output}_{op}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            attribute: attributes,
            ..Default::default()
        });
        output.to_string()
    }

    fn constant(&mut self, name: &str, dims: &[usize], values: Vec<f64>) -> String {
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        self.initializers.push(numbers_tensor(name, &dims, 1, &values));
        name.to_string()
    }

    /// Conv (He-normal weights, no bias) then BatchNorm, optionally Relu.
    fn conv_bn(
        &mut self,
        name: &str,
        input: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        relu: bool,
    ) -> String {
        let deviation = (2.0 / (cin * kernel * kernel) as f64).sqrt();
        let weights: Vec<f64> = (0..cout * cin * kernel * kernel).map(|_| deviation * self.standard_normal()).collect();
        let w = self.constant(&format!("{name}.weight"), &[cout, cin, kernel, kernel], weights);
        let pad = (kernel / 2) as i64;
        let conv = self.node(
            "Conv",
            &[input, &w],
            &format!("{name}.conv"),
            vec![
                ints("kernel_shape", &[kernel as i64, kernel as i64]),
                ints("strides", &[stride as i64, stride as i64]),
                ints("pads", &[pad, pad, pad, pad]),
            ],
        );
        let gamma = self.constant(&format!("{name}.bn.weight"), &[cout], vec![1.0; cout]);
        let beta = self.constant(&format!("{name}.bn.bias"), &[cout], vec![0.0; cout]);
        let mean = self.constant(&format!("{name}.bn.running_mean"), &[cout], vec![0.0; cout]);
        let var = self.constant(&format!("{name}.bn.running_var"), &[cout], vec![1.0; cout]);
        let bn = self.node("BatchNormalization", &[&conv, &gamma, &beta, &mean, &var], &format!("{name}.bn"), vec![]);
        if relu {
            self.node("Relu", &[&bn], &format!("{name}.relu"), vec![])
        } else {
            bn
        }
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = |d: &Option<usize>| Dimension {
        value: Some(match d {
            Some(n) => DimValue::DimValue(*n as i64),
            None => DimValue::DimParam("batch".into()),
        }),
        denotation: String::new(),
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto { dim: dims.iter().map(dim).collect() }),
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    }
}

/// The name of the network's input.
pub const INPUT: &str = "input";

/// The untrained network, with seeded He-normal initialization.
pub fn resnet(architecture: Architecture, seed: u64) -> Result<ModelProto, String> {
    architecture.check()?;
    let Architecture { depth, width, channels, classes, .. } = architecture;
    let mut b =
        Builder { nodes: Vec::new(), initializers: Vec::new(), rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed) };
    let mut x = b.conv_bn("stem", INPUT, channels, width, 3, 1, true);
    let mut cin = width;
    for stage in 0..3 {
        let cout = width << stage;
        for block in 0..(depth - 2) / 6 {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            let name = format!("stage{}.block{}", stage + 1, block + 1);
            let y = b.conv_bn(&format!("{name}.1"), &x, cin, cout, 3, stride, true);
            let y = b.conv_bn(&format!("{name}.2"), &y, cout, cout, 3, 1, false);
            let shortcut = if stride != 1 || cin != cout {
                b.conv_bn(&format!("{name}.down"), &x, cin, cout, 1, stride, false)
            } else {
                x.clone()
            };
            let sum = b.node("Add", &[&y, &shortcut], &format!("{name}.add"), vec![]);
            x = b.node("Relu", &[&sum], &format!("{name}.out"), vec![]);
            cin = cout;
        }
    }
    let pooled = b.node("GlobalAveragePool", &[&x], "pool", vec![]);
    let flat = b.node("Flatten", &[&pooled], "flat", vec![]);
    let bound = 1.0 / (cin as f64).sqrt();
    let fc_weights: Vec<f64> = (0..classes * cin).map(|_| b.rng.random_range(-bound..bound)).collect();
    let fc_bias: Vec<f64> = (0..classes).map(|_| b.rng.random_range(-bound..bound)).collect();
    let w = b.constant("fc.weight", &[classes, cin], fc_weights);
    let bias = b.constant("fc.bias", &[classes], fc_bias);
    let trans_b =
        AttributeProto { name: "transB".into(), r#type: AttributeType::Int as i32, i: 1, ..Default::default() };
    b.node("Gemm", &[&flat, &w, &bias], "logits", vec![trans_b]);
    let graph = GraphProto {
        name: format!("resnet{depth}"),
        node: b.nodes,
        initializer: b.initializers,
        input: vec![value_info(INPUT, &[None, Some(channels), Some(architecture.height), Some(architecture.width_px)])],
        output: vec![value_info("logits", &[None, Some(classes)])],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: 8,
        producer_name: "qsweep".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(graph),
        ..Default::default()
    })
}
