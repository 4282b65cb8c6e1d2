//! train: trains the fp32 model a spec declares with `model: {"train":
//! {...}}` (a ResNet qsweep writes, see `train::resnet`), so the whole sweep
//! needs no Python. Every task that reads the model takes this task as its
//! `fp32_model` input, so a new training recipe invalidates all of them.

use std::path::Path;

use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{params, StageContext, StageError};
use crate::plan::Task;
use crate::spec::{Dataset, Preprocess, TrainSpec};
use crate::train::baseline::{self, BaselineOptions, Start};
use crate::train::fit::{self, Recipe};

pub const VERSION: u32 = 3;

/// The trained model in the artifact.
pub const MODEL: &str = "model.onnx";

#[derive(Deserialize)]
struct Params {
    train: TrainSpec,
    data: DataParams,
}

#[derive(Deserialize)]
struct DataParams {
    dataset: Dataset,
    preprocess: Preprocess,
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let Params { train, data } = params(task)?;
    let recipe = Recipe::of(&train);
    let options = BaselineOptions {
        start: Start::ResNet { depth: train.depth as usize, width: train.width as usize },
        dataset: data.dataset,
        data_dir: context.sweep.data_dir.clone(),
        preprocess: data.preprocess,
        samples: train.samples as usize,
        recipe: recipe.clone(),
        checkpoint: fit::checkpoint_dir(context.results.root(), &task.key.0),
    };
    let trained = baseline::train(&options, context.cancel, super::report_steps(context, recipe.epochs))?;
    super::write_file(&out.join(MODEL), &trained.model.encode_to_vec())?;
    let _ = std::fs::remove_dir_all(&options.checkpoint);
    Ok(json!({
        "architecture": format!("resnet-{}", train.depth),
        "width": train.width,
        "epochs": train.epochs,
        "test_accuracy": trained.test_accuracy,
        "epoch_losses": trained.outcome.epoch_losses,
        "images_per_s": trained.outcome.images_per_s,
    }))
}
