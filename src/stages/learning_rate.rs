//! learning-rate: `qat.learning_rate: "auto"`, a short range test that
//! picks QAT's starting rate.
//!
//! A model's original training rate is not in its ONNX file, and QAT's
//! rule of thumb (1% of it) is only as good as the guess behind it: on the
//! reference model NVIDIA's 1% of 0.1 ended below PTQ. So each candidate
//! rate, spread around 1% of a typical 0.1, fine-tunes the PTQ model for a
//! share of an epoch of the training subset (a seeded draw from all of it), and is scored on the
//! validation subset; the most right answers win, then the lower
//! validation loss, then the smaller rate. The test starts from one fixed recipe (mse ranges, no residual
//! quantizers), so its task depends only on the model, the data and the
//! int8 format, and every QAT run of a sweep shares it.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use super::build::{ptq_model, Quantizer};
use super::qat::{check_fits, examples_for, fake_quantized, read_error};
use super::{params, StageContext, StageError};
use crate::plan::{Task, QAT_VALIDATION};
use crate::spec::{Augmentation, CalibrationMethod, Int8Format, QatSelect};
use crate::train::fit::{self, Recipe, Validation};
use crate::train::TrainError;

pub const VERSION: u32 = 2;

/// The rates tried: 0.1%, 0.3%, 1% and 3% of a typical training rate of 0.1.
pub const CANDIDATES: [f64; 4] = [1e-4, 3e-4, 1e-3, 3e-3];

/// The share of an epoch of the training subset each candidate trains for.
pub const SHARE: f64 = 0.25;

/// The artifact's file naming the chosen rate, which QAT stages read.
pub const CHOSEN: &str = "learning_rate.json";

#[derive(Deserialize)]
struct Params {
    format: Int8Format,
    candidates: Vec<f64>,
    share: f64,
    momentum: f64,
    weight_decay: f64,
    batch_size: usize,
    seed: u64,
    augment: Vec<Augmentation>,
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let params: Params = params(task)?;
    let quantizer = Quantizer { calibration: CalibrationMethod::Mse, residual_fusion: false };
    let ptq = ptq_model(task, context, &quantizer, params.format, None)?;
    let training = examples_for(task, context, "data")?;
    check_fits(&ptq.model, &training)?;
    let validation = examples_for(task, context, QAT_VALIDATION)?;
    let share_len = ((training.len() as f64 * params.share).ceil() as usize).max(params.batch_size);
    let share = training.sample(share_len, params.seed);

    let mut scores = Vec::with_capacity(params.candidates.len());
    let mut start = None;
    for (index, &rate) in params.candidates.iter().enumerate() {
        (context.report)(&format!("rate {} of {}: {rate:e}", index + 1, params.candidates.len()));
        let mut network = fake_quantized(&ptq.model, params.format)?;
        let recipe = Recipe {
            epochs: 1,
            learning_rate: rate,
            momentum: params.momentum,
            weight_decay: params.weight_decay,
            batch_size: params.batch_size,
            seed: params.seed,
            augment: params.augment.clone(),
        };
        let checkpoint = fit::checkpoint_dir(context.results.root(), &format!("{}-{index}", task.key.0));
        let validate = Validation { examples: &validation, select: QatSelect::Last };
        let trained = fit::fit(&mut network, &share, &recipe, &checkpoint, Some(&validate), context.cancel, |_| {});
        let _ = std::fs::remove_dir_all(&checkpoint);
        let outcome = match trained {
            // A rate whose loss blows up is this test's answer about it,
            // not a failure of the test.
            Err(TrainError::NotFinite { .. }) => {
                scores.push(json!({"learning_rate": rate, "top1": 0.0, "correct": 0, "loss": null, "diverged": true}));
                continue;
            }
            trained => trained.map_err(|e| read_error(task, context, e))?,
        };
        let [before, after] = outcome.curve.as_slice() else {
            return Err(StageError::Fatal("a one-epoch range test gave no validation score".into()));
        };
        start.get_or_insert_with(|| before.clone());
        scores.push(json!({"learning_rate": rate, "top1": after.top1, "correct": after.correct, "loss": after.loss}));
    }
    if start.is_none() {
        return Err(StageError::Fatal(format!(
            "every candidate learning rate of the range test ({:?}) made the loss not finite (NaN or infinite); set qat.learning_rate to a number below {:e}",
            params.candidates, params.candidates.first().copied().unwrap_or(CANDIDATES[0])
        )));
    }
    // Candidates are ascending, so the first of equals is the smaller rate.
    let rank = |s: &Value| (s["correct"].as_u64().unwrap_or_default(), -s["loss"].as_f64().unwrap_or(f64::INFINITY));
    let best = scores
        .iter()
        .reduce(|best, next| if rank(next) > rank(best) { next } else { best })
        .ok_or_else(|| StageError::Fatal("the range test has no candidate rates".into()))?;
    let chosen = best["learning_rate"].as_f64().unwrap_or_default();
    super::write_file(&out.join(CHOSEN), json!({ "learning_rate": chosen }).to_string().as_bytes())?;
    Ok(json!({
        "learning_rate": chosen,
        "candidates": scores,
        "start_top1": start.map(|s| s.top1),
        "samples": share.len(),
        "validation_samples": validation.len(),
        "quantizer": {"calibration": "mse", "residual_fusion": false},
    }))
}
