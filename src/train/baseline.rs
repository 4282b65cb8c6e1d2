//! `qsweep train`: trains the fp32 baseline, from a ResNet that
//! `resnet` writes or from any ONNX model given as the start, on the
//! dataset's training split, and reports its top-1 on the test split.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_onnx::onnx::ModelProto;

use super::fit::{self, Examples, Recipe, Step};
use super::network::{BatchNorm, Network};
use super::resnet::{resnet, Architecture};
use super::TrainError;
use crate::data::{self, Split};
use crate::spec::{Dataset, Preprocess};

/// Where training starts.
pub enum Start {
    ResNet { depth: usize, width: usize },
    Model(ModelProto),
}

pub struct BaselineOptions {
    pub start: Start,
    pub dataset: Dataset,
    pub data_dir: PathBuf,
    pub preprocess: Preprocess,
    /// Training images used (a seeded subset when below the split's size).
    pub samples: usize,
    pub recipe: Recipe,
    pub checkpoint: PathBuf,
}

pub struct Trained {
    pub model: ModelProto,
    pub test_accuracy: f64,
    pub outcome: fit::Outcome,
}

/// The preprocessed images of a split, or a subset of it.
fn examples(options: &BaselineOptions, split: Split, samples: Option<usize>) -> Result<Examples, TrainError> {
    let raw = data::load_split(options.dataset, &options.data_dir, split)
        .map_err(|e| TrainError::Model(format!("{e}\n  fix: {}", e.fix(options.dataset))))?;
    let indices = samples.map(|n| data::calibration_indices(raw.count, n, options.recipe.seed));
    Ok(raw.preprocess(&options.preprocess, indices.as_deref()).into())
}

pub fn train(options: &BaselineOptions, cancel: &AtomicBool, on_step: impl FnMut(Step)) -> Result<Trained, TrainError> {
    let train = examples(options, Split::Train, Some(options.samples))?;
    let [channels, height, width_px] = train.image_shape;
    let start = match &options.start {
        Start::ResNet { depth, width } => {
            let architecture = Architecture { depth: *depth, width: *width, channels, height, width_px, classes: 10 };
            resnet(architecture, options.recipe.seed).map_err(TrainError::Model)?
        }
        Start::Model(model) => model.clone(),
    };
    let mut network = Network::from_model(&start, BatchNorm::Batch, None)?;
    // A model that does not fit the images fails on the first batch; say so plainly.
    let (probe, _) = train.batch(&[0])?;
    network.forward(&probe, false).map_err(|e| {
        TrainError::Model(format!(
            "the model cannot take {channels}x{height}x{width_px} images: {e}\n  fix: start from a model made for this dataset"
        ))
    })?;
    let outcome = fit::fit(&mut network, &train, &options.recipe, &options.checkpoint, None, cancel, on_step)?;
    let (test_accuracy, _) = fit::accuracy(&mut network, &examples(options, Split::Test, None)?, 500)?;
    Ok(Trained { model: network.export(&start)?, test_accuracy, outcome })
}
