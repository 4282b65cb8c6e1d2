//! qat: fine-tunes a run's PTQ model with fake quantization, and writes the
//! Q/DQ model with the trained weights, which build and evaluate take as
//! they take a PTQ model.
//!
//! It starts from exactly what PTQ would build: the Q/DQ model from the
//! calibrate stage's ranges under the run's method, with residual
//! quantizers when fusion is on. The interpreter (`train::network`) runs
//! that model with every Q/DQ pair as fake quantization, trains its weights
//! (int8 weights as float shadows, kept inside the format's range), and
//! writes them back quantized with the same scales. Activation scales stay
//! those calibrated. A checkpoint after each epoch, kept outside the
//! artifact until the stage completes, lets a killed attempt resume.

use std::path::Path;

use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use super::build::{ptq_model, Quantizer, QDQ_MODEL};
use super::{params, StageContext, StageError};
use crate::onnx::{self, Dim};
use crate::plan::Task;
use crate::quant::qdq;
use crate::spec::Int8Format;
use crate::train::fit::{self, Examples, Recipe};
use crate::train::network::{BatchNorm, Network};
use crate::train::TrainError;

pub const VERSION: u32 = 1;

#[derive(Deserialize)]
struct Params {
    quantizer: Quantizer,
    format: Int8Format,
    percentile: Option<f64>,
    epochs: u32,
    learning_rate: f64,
    momentum: f64,
    weight_decay: f64,
    batch_size: usize,
    seed: u64,
    augment: bool,
}

impl From<TrainError> for StageError {
    fn from(error: TrainError) -> Self {
        match error {
            TrainError::Cancelled => StageError::Cancelled,
            other => StageError::Fatal(other.to_string()),
        }
    }
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let params: Params = params(task)?;
    let ptq = ptq_model(task, context, &params.quantizer, params.format, params.percentile)?;
    let mut network = Network::from_model(&ptq.model, BatchNorm::Frozen, Some(qdq::weight_levels(params.format)))?;
    let read_error = |e: TrainError| match e {
        TrainError::Data(e) => context.read_error(task, "data", e),
        other => other.into(),
    };
    let examples = Examples::prepared(context.prepared(task, "data")?).map_err(read_error)?;
    check_fits(&ptq.model, &examples)?;

    let recipe = Recipe {
        epochs: params.epochs,
        learning_rate: params.learning_rate,
        momentum: params.momentum,
        weight_decay: params.weight_decay,
        batch_size: params.batch_size,
        seed: params.seed,
        augment: params.augment,
    };
    let checkpoint = fit::checkpoint_dir(context.results.root(), &task.key.0);
    let outcome = fit::fit(
        &mut network,
        &examples,
        &recipe,
        &checkpoint,
        context.cancel,
        super::report_steps(context, recipe.epochs),
    )
    .map_err(read_error)?;
    let trained = network.export(&ptq.model)?;
    let float_ops: std::collections::BTreeSet<String> = ptq.summary.float_ops.iter().cloned().collect();
    qdq::lint(&trained, params.quantizer.residual_fusion, &float_ops).map_err(|e| StageError::Fatal(e.to_string()))?;
    super::write_file(&out.join(QDQ_MODEL), &trained.encode_to_vec())?;
    // The artifact now holds what the checkpoint was for.
    let _ = std::fs::remove_dir_all(&checkpoint);
    Ok(json!({
        "epochs": params.epochs,
        "samples": examples.len(),
        "learning_rate": params.learning_rate,
        "batch_size": params.batch_size,
        "epoch_losses": outcome.epoch_losses,
        "resumed_epochs": outcome.resumed_epochs,
        "images_per_s": outcome.images_per_s,
        "batch_norm": "frozen",
    }))
}

/// A dataset whose images do not fit the model's input is named before training.
fn check_fits(model: &candle_onnx::onnx::ModelProto, examples: &Examples) -> Result<(), StageError> {
    let decoded = onnx::Model { path: Default::default(), proto: model.clone() };
    let Some(input) = decoded.inputs().into_iter().next() else { return Ok(()) };
    let Some(dims) = &input.shape else { return Ok(()) };
    let wanted: Vec<Option<usize>> =
        dims.iter().skip(1).map(|d| if let Dim::Fixed(n) = d { Some(*n as usize) } else { None }).collect();
    let fits =
        wanted.len() == 3 && wanted.iter().zip(examples.image_shape).all(|(w, have)| w.is_none_or(|w| w == have));
    if fits {
        Ok(())
    } else {
        Err(StageError::Fatal(format!(
            "the training images are {:?} (channels, height, width) but the model's input {} is {}\n  fix: use a dataset and preprocessing that match the model",
            examples.image_shape,
            input.name,
            input.shape_text()
        )))
    }
}
