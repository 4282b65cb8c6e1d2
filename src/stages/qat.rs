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
//!
//! The validation subset scores the start (epoch 0, the PTQ model) and
//! every epoch; the artifact keeps that curve and, with `select: best`,
//! the best epoch's weights, a later epoch winning only by more than
//! validation noise, so a recipe that does not clearly improve on PTQ
//! returns the PTQ model. The learning rate is the spec's
//! or, for "auto", the `learning-rate` stage's pick.

use std::path::Path;

use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use super::build::{ptq_model, Quantizer, QDQ_MODEL};
use super::{learning_rate, params, StageContext, StageError};
use crate::data::prepared::PreparedError;
use crate::onnx::{self, Dim};
use crate::plan::{Task, LEARNING_RATE, QAT_VALIDATION};
use crate::quant::qdq;
use crate::spec::{Augmentation, Int8Format, QatLearningRate, QatSelect};
use crate::train::fit::{self, Examples, Recipe, Validation};
use crate::train::network::{BatchNorm, Network};
use crate::train::TrainError;

pub const VERSION: u32 = 4;

#[derive(Deserialize)]
struct Params {
    quantizer: Quantizer,
    format: Int8Format,
    percentile: Option<f64>,
    epochs: u32,
    learning_rate: QatLearningRate,
    momentum: f64,
    weight_decay: f64,
    batch_size: usize,
    seed: u64,
    augment: Vec<Augmentation>,
    select: QatSelect,
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
    let mut network = fake_quantized(&ptq.model, params.format)?;
    let examples = examples_for(task, context, "data")?;
    check_fits(&ptq.model, &examples)?;
    let validation = examples_for(task, context, QAT_VALIDATION)?;
    let (learning_rate, chosen_by) = match params.learning_rate {
        QatLearningRate::Fixed(rate) => (rate, "spec"),
        QatLearningRate::Auto(_) => {
            let tested: Value = super::read_json(&context.input_dir(task, LEARNING_RATE)?, learning_rate::CHOSEN)?;
            let rate = tested["learning_rate"]
                .as_f64()
                .ok_or_else(|| StageError::Fatal(format!("{} names no learning rate", learning_rate::CHOSEN)))?;
            (rate, "range test")
        }
    };

    let recipe = Recipe {
        epochs: params.epochs,
        learning_rate,
        momentum: params.momentum,
        weight_decay: params.weight_decay,
        batch_size: params.batch_size,
        seed: params.seed,
        augment: params.augment.clone(),
    };
    let checkpoint = fit::checkpoint_dir(context.results.root(), &task.key.0);
    let outcome = fit::fit(
        &mut network,
        &examples,
        &recipe,
        &checkpoint,
        Some(&Validation { examples: &validation, select: params.select }),
        context.cancel,
        super::report_steps(context, recipe.epochs),
    )
    .map_err(|e| read_error(task, context, e))?;
    let trained = network.export(&ptq.model)?;
    let float_ops: std::collections::BTreeSet<String> = ptq.summary.float_ops.iter().cloned().collect();
    qdq::lint(&trained, params.quantizer.residual_fusion, &float_ops).map_err(|e| StageError::Fatal(e.to_string()))?;
    super::write_file(&out.join(QDQ_MODEL), &trained.encode_to_vec())?;
    // The artifact now holds what the checkpoint was for.
    let _ = std::fs::remove_dir_all(&checkpoint);
    let kept_epoch = outcome.kept_epoch.unwrap_or(params.epochs);
    Ok(json!({
        "epochs": params.epochs,
        "samples": examples.len(),
        "validation_samples": validation.len(),
        "learning_rate": learning_rate,
        "learning_rate_from": chosen_by,
        "batch_size": params.batch_size,
        "augment": params.augment.iter().map(Augmentation::torchvision).collect::<Vec<_>>(),
        "select": params.select,
        "curve": outcome.curve,
        "kept_epoch": kept_epoch,
        "epoch_losses": outcome.epoch_losses,
        "resumed_epochs": outcome.resumed_epochs,
        "images_per_s": outcome.images_per_s,
        "validation_s": outcome.validation_s,
        "diverged": outcome.diverged,
        "batch_norm": "frozen",
    }))
}

/// A PTQ model as the interpreter trains it: every Q/DQ pair a fake
/// quantizer, BatchNorm frozen, int8 weights as float shadows kept inside
/// the format's range.
pub(super) fn fake_quantized(model: &candle_onnx::onnx::ModelProto, format: Int8Format) -> Result<Network, StageError> {
    Ok(Network::from_model(model, BatchNorm::Frozen, Some(qdq::weight_levels(format)))?)
}

/// The labelled examples of the prepared data playing `role`.
pub(super) fn examples_for(task: &Task, context: &StageContext<'_>, role: &str) -> Result<Examples, StageError> {
    Examples::prepared(context.prepared(task, role)?).map_err(|e| match e {
        TrainError::Data(e) => context.read_error(task, role, e),
        other => other.into(),
    })
}

/// A training error as the stage's: a damaged shard sets aside the
/// subset it belongs to, fine-tuning or validation.
pub(super) fn read_error(task: &Task, context: &StageContext<'_>, error: TrainError) -> StageError {
    match error {
        TrainError::Data(e) => {
            let in_validation = match (&e, task.input(QAT_VALIDATION)) {
                (PreparedError::Damaged { path, .. }, Some(key)) => path.starts_with(context.results.artifact_dir(key)),
                _ => false,
            };
            context.read_error(task, if in_validation { QAT_VALIDATION } else { "data" }, e)
        }
        other => other.into(),
    }
}

/// A dataset whose images do not fit the model's input is named before training.
pub(super) fn check_fits(model: &candle_onnx::onnx::ModelProto, examples: &Examples) -> Result<(), StageError> {
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
