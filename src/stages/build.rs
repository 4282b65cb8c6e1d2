//! build: turns a model into the engine artifact that evaluate measures.
//!
//! With ONNX Runtime the engine is the graph after every optimization
//! (constant folding, Conv+BatchNorm and activation fusion, layout
//! transforms), saved so evaluation loads exactly what was built. The saved
//! graph can hold CPU-specific layout operators, so it belongs to the
//! machine kind that built it, like a TensorRT plan file.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{params, StageContext, StageError};
use crate::engine::{self, InferenceSession};
use crate::onnx;
use crate::plan::Task;

pub const VERSION: u32 = 1;

pub const ENGINE_MODEL: &str = "model.onnx";

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", tag = "precision")]
enum Params {
    Fp32 {},
    Int8 {},
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let source = match params::<Params>(task)? {
        Params::Fp32 {} => context.sweep.model_path.clone(),
        Params::Int8 {} => {
            return Err(StageError::Fatal(
                "this qsweep cannot build int8 engines yet; upgrade it".into(),
            ));
        }
    };
    let built = out.join(ENGINE_MODEL);
    // One thread: building is a one-off graph rewrite, and the saved graph
    // does not depend on the thread count.
    InferenceSession::open(&source, 1, Some(&built))?;
    let source_model = onnx::Model::load(&source).map_err(|e| StageError::Fatal(e.to_string()))?;
    let built_model =
        onnx::Model::load(&built).map_err(|e| StageError::Retryable(e.to_string()))?;
    Ok(json!({
        "precision": "fp32",
        "model_bytes": std::fs::metadata(&source)?.len(),
        "engine_bytes": std::fs::metadata(&built)?.len(),
        "nodes_before": source_model.node_count(),
        "nodes_after": built_model.node_count(),
        "onnxruntime": engine::runtime()?.version,
    }))
}
