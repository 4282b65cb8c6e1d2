//! build: turns a model into the engine artifact that evaluate measures.
//!
//! With ONNX Runtime the engine is the graph after every optimization
//! (constant folding, Conv+BatchNorm and activation fusion, layout
//! transforms), saved so evaluation loads exactly what was built. The saved
//! graph can hold CPU-specific layout operators, so it belongs to the
//! machine kind that built it, like a TensorRT plan file.

use std::path::Path;

use std::collections::HashMap;

use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use super::calibrate::Statistics;
use super::{params, StageContext, StageError};
use crate::engine::{self, InferenceSession, Provider};
use crate::onnx;
use crate::plan::Task;
use crate::quant::{amax, coverage, qdq};
use crate::spec::{CalibrationMethod, Engine, Int8Format};

pub const VERSION: u32 = 3;

pub const ENGINE_MODEL: &str = "model.onnx";

/// The fp32 graph the fp32 build starts from: the spec's model, with a
/// fixed batch of 1 freed where the graph allows.
pub const FP32_MODEL: &str = "fp32.onnx";

/// The Q/DQ model the int8 build writes before optimizing it: the file
/// to hand to TensorRT or any other explicit-quantization engine.
pub const QDQ_MODEL: &str = "qdq.onnx";

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", tag = "precision")]
enum Params {
    Fp32 { engine: Engine },
    Int8 { quantizer: Quantizer, format: Int8Format, percentile: Option<f64>, engine: Engine },
}

#[derive(Deserialize)]
pub struct Quantizer {
    pub calibration: CalibrationMethod,
    pub residual_fusion: bool,
}

/// The PTQ Q/DQ model of a run: the calibrated ranges under its method,
/// written in its format; QAT starts from it.
pub struct PtqModel {
    pub model: candle_onnx::onnx::ModelProto,
    pub summary: qdq::QdqSummary,
    /// Calibrated tensors' shapes, for the coverage report.
    pub shapes: HashMap<String, Vec<usize>>,
}

/// Each calibrated tensor's range under `method`.
pub fn calibrated_ranges(
    statistics: &Statistics,
    method: CalibrationMethod,
    percentile: Option<f64>,
) -> HashMap<String, qdq::Range> {
    statistics
        .tensors
        .iter()
        .map(|t| {
            let amax = amax::amax(method, &t.histogram, percentile.unwrap_or(99.99));
            (t.name.clone(), qdq::Range { amax, nonnegative: t.histogram.min >= 0.0 })
        })
        .collect()
}

/// The PTQ model of `task`'s recipe, with the ops its `float_layers`
/// chose left in float (`fallback::chosen`).
pub fn ptq_model(
    task: &Task,
    context: &StageContext<'_>,
    quantizer: &Quantizer,
    format: Int8Format,
    percentile: Option<f64>,
) -> Result<PtqModel, StageError> {
    let statistics = Statistics::read(&context.input_dir(task, "calibration")?)?;
    let ranges = calibrated_ranges(&statistics, quantizer.calibration, percentile);
    let shapes = statistics.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    let model = context.load_model(task)?;
    let fallback = super::fallback::chosen(task, context)?;
    let (model, summary) = qdq::quantize_except(&model.proto, &ranges, format, quantizer.residual_fusion, &fallback)
        .map_err(|e| StageError::Fatal(e.to_string()))?;
    Ok(PtqModel { model, summary, shapes })
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let mut shapes = HashMap::new();
    let params: Params = params(task)?;
    let (engine, int8) = match &params {
        Params::Fp32 { engine } => (*engine, false),
        Params::Int8 { engine, .. } => (*engine, true),
    };
    let (source, mut metrics) = match params {
        Params::Fp32 { .. } => {
            // The graph the other stages see, which may differ from the file.
            let path = out.join(FP32_MODEL);
            super::write_file(&path, &context.load_model(task)?.proto.encode_to_vec())?;
            (path, json!({"precision": "fp32"}))
        }
        Params::Int8 { quantizer, format, percentile, .. } => {
            let ptq = ptq_model(task, context, &quantizer, format, percentile)?;
            shapes = ptq.shapes;
            let qdq_path = out.join(QDQ_MODEL);
            match task.input("model") {
                // QAT fine-tuned the PTQ model; its weights are what to build.
                Some(_) => {
                    let trained = context.input_dir(task, "model")?.join(QDQ_MODEL);
                    super::write_file(&qdq_path, &std::fs::read(&trained).map_err(super::io_at(&trained))?)?
                }
                None => super::write_file(&qdq_path, &ptq.model.encode_to_vec())?,
            }
            let summary = ptq.summary;
            let metrics = json!({
                "precision": "int8",
                "format": format,
                "folded_batch_norms": summary.folded_batch_norms,
                "calibration": quantizer.calibration,
                "residual_fusion": quantizer.residual_fusion,
                "qdq_pairs": summary.qdq_pairs,
                "dead": summary.dead,
                "float_residual_adds": summary.float_adds,
                "float_ops": summary.float_ops,
            });
            (qdq_path, metrics)
        }
    };
    let built = out.join(ENGINE_MODEL);
    let provider = Provider::for_engine(engine, int8, out);
    let source_model = onnx::Model::load(&source).map_err(|e| StageError::Fatal(e.to_string()))?;
    let mut extra = json!({
        "model_bytes": std::fs::metadata(&source).map_err(super::io_at(&source))?.len(),
        "nodes_before": source_model.node_count(),
        "provider": provider.name(),
        "provider_options": provider.options().into_iter().collect::<HashMap<_, _>>(),
        "onnxruntime": engine::runtime()?.version,
    });
    if provider == Provider::Cpu {
        // One thread: building is a one-off graph rewrite, and the saved
        // graph does not depend on the thread count.
        InferenceSession::open(&source, 1, Some(&built))?;
        let fp32_model = context.load_model(task)?;
        let built_model = onnx::Model::load(&built).map_err(|e| StageError::Retryable(e.to_string()))?;
        extra["engine_bytes"] = json!(std::fs::metadata(&built).map_err(super::io_at(&built))?.len());
        extra["nodes_after"] = json!(built_model.node_count());
        extra["coverage"] = json!(coverage::of(&fp32_model, &built_model, &shapes));
    } else {
        // GPU providers compile their own engine: opening the session builds
        // it, and TensorRT caches it beside the model in this artifact.
        // Untested here: no GPU is available to qsweep's CI.
        let bytes = std::fs::read(&source).map_err(super::io_at(&source))?;
        super::write_file(&built, &bytes)?;
        InferenceSession::open_with(&built, engine::resolve_threads(0), None, &provider)?;
        extra["engine_bytes"] = json!(directory_bytes(out).map_err(super::io_at(out))?);
    }
    metrics.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
    Ok(metrics)
}

fn directory_bytes(dir: &Path) -> std::io::Result<u64> {
    std::fs::read_dir(dir)?.map(|e| e.and_then(|e| e.metadata()).map(|m| m.len())).sum()
}
