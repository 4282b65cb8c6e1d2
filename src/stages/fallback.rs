//! fallback: `float_layers: "auto"`. Leaves ops in float one at a time,
//! most sensitive first (the sensitivity stage's ranking), until the
//! model's validation top-1 is within the budget of fp32's, and records
//! every step: the ops in float, validation and test top-1, batch-1
//! latency, and the step's Q/DQ model.
//!
//! The budget is judged on the validation subset only, which holds no
//! calibration or test image; the test figure is recorded beside it so
//! the report can show what the budget bought on data it never saw. A
//! budget not met within `max_float_layers` still returns a model: the
//! step with the best validation top-1, with a note that says so.
//!
//! Steps run on the CPU whatever the sweep's engine; the run's build then
//! makes its engine from the chosen ops, and its evaluation is the run's
//! figure.

use std::collections::BTreeSet;
use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::build::calibrated_ranges;
use super::calibrate::Statistics;
use super::sensitivity::{Ancestry, Ranking, Scorer};
use super::{params, StageContext, StageError};
use crate::engine::{self, InferenceSession};
use crate::plan::Task;
use crate::progress::Walk;
use crate::quant::qdq::{self, Fallback};
use crate::spec::{FallbackPrecision, FloatLayers};

pub const VERSION: u32 = 2;

pub const SEARCH: &str = "search.json";

/// Timed batch-1 runs per step, after as many untimed: enough to order
/// steps, not the run's latency figure (its evaluate stage measures that).
const STEP_LATENCY_RUNS: usize = 30;

#[derive(Deserialize)]
struct Params {
    #[serde(flatten)]
    ancestry: Ancestry,
    /// Points of validation top-1 below fp32's that are accepted.
    accuracy_budget: f64,
    /// None: a quarter of the quantized ops, at least one.
    max_float_layers: Option<usize>,
    #[serde(default)]
    fallback_precision: FallbackPrecision,
}

/// One step of the search: this many of the most sensitive ops in float.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub float_ops: Vec<String>,
    /// Top-1 on the validation subset, in percent.
    pub validation_top1: f64,
    /// Top-1 on the test split, in percent; none where it has no labels.
    pub test_top1: Option<f64>,
    /// Batch-1 median on the CPU, in ms.
    pub latency_ms: f64,
    /// The step's Q/DQ model, in this artifact.
    pub model: String,
    pub within_budget: bool,
}

/// The fallback stage's artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Search {
    pub accuracy_budget: f64,
    pub max_float_layers: usize,
    pub validation_images: usize,
    pub fp32_validation_top1: f64,
    pub fp32_test_top1: Option<f64>,
    pub steps: Vec<Step>,
    /// The step whose ops the run leaves in float.
    pub chosen: usize,
    pub budget_met: bool,
    /// What happened, in words, when the budget was not met.
    pub note: Option<String>,
    /// Seconds to the decision (each step's Q/DQ model, validation pass and
    /// latency), and on top of that scoring each step on the test split,
    /// which the decision never reads.
    pub search_s: f64,
    pub test_s: f64,
}

impl Search {
    pub fn read(dir: &Path) -> Result<Self, StageError> {
        super::read_json(dir, SEARCH)
    }

    pub fn chosen_step(&self) -> &Step {
        &self.steps[self.chosen]
    }
}

/// The ops a build or QAT task leaves in float: none, the k its
/// `sensitivity` input ranks first, or those its `fallback` input chose.
pub fn chosen(task: &Task, context: &StageContext<'_>) -> Result<Fallback, StageError> {
    #[derive(Deserialize)]
    struct FloatParams {
        #[serde(default)]
        float_layers: FloatLayers,
        #[serde(default)]
        fallback_precision: FallbackPrecision,
    }
    let p: FloatParams = params(task)?;
    let ops = match p.float_layers {
        FloatLayers::Count(0) => BTreeSet::new(),
        FloatLayers::Count(k) => {
            let ranking = Ranking::read(&context.input_dir(task, "sensitivity")?)?;
            if k as usize > ranking.ops.len() {
                return Err(StageError::Fatal(format!(
                    "float_layers {k} asks for more ops in float than the {} this recipe quantizes",
                    ranking.ops.len()
                )));
            }
            ranking.most_sensitive(k as usize)
        }
        FloatLayers::Auto(_) => {
            Search::read(&context.input_dir(task, "fallback")?)?.chosen_step().float_ops.iter().cloned().collect()
        }
    };
    Ok(Fallback { ops, precision: p.fallback_precision })
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let started = std::time::Instant::now();
    let mut test_s = 0.0;
    let mut timed_test = |session: &mut InferenceSession| -> Result<Option<f64>, StageError> {
        let started = std::time::Instant::now();
        let top1 = top1_of(task, context, "test", session);
        test_s += started.elapsed().as_secs_f64();
        top1
    };
    let p: Params = params(task)?;
    let ranking = Ranking::read(&context.input_dir(task, "sensitivity")?)?;
    let statistics = Statistics::read(&context.input_dir(task, "calibration")?)?;
    let ranges = calibrated_ranges(&statistics, p.ancestry.quantizer.calibration, p.ancestry.percentile);
    let model = context.load_model(task)?;
    let scorer = Scorer::new(task, context, p.ancestry.output.as_deref());
    let first_image = scorer.first_images(1)?;
    let validation_top1 = |session: &mut InferenceSession| -> Result<f64, StageError> {
        top1_of(task, context, "data", session)?.ok_or_else(|| {
            StageError::Fatal("the validation subset has no labels, which the accuracy budget needs".into())
        })
    };
    let quarter = ranking.ops.len().div_ceil(4).max(1);
    let max_float_layers = p.max_float_layers.unwrap_or(quarter).min(ranking.ops.len());

    let mut walk = Walk::new(context.report, "steps", max_float_layers + 2);
    let mut fp32 = scorer.open(&model.proto, out)?;
    let fp32_validation_top1 = validation_top1(&mut fp32)?;
    let fp32_test_top1 = timed_test(&mut fp32)?;
    drop(fp32);
    walk.advance(1);

    let mut steps: Vec<Step> = Vec::new();
    let mut float_ops = BTreeSet::new();
    for row in std::iter::once(None).chain(ranking.ops.iter().map(Some)) {
        // Each step adds the next row's ops; one that adds none (shared
        // with an earlier row) or too many is not a step.
        let mut with = float_ops.clone();
        with.extend(row.iter().flat_map(|r| r.float_ops.iter().cloned()));
        if row.is_some() && (with.len() == float_ops.len() || with.len() > max_float_layers) {
            continue;
        }
        float_ops = with;
        let k = steps.len();
        let fallback = Fallback { ops: float_ops.clone(), precision: p.fallback_precision };
        let (variant, _) = qdq::quantize_except(
            &model.proto,
            &ranges,
            p.ancestry.format,
            p.ancestry.quantizer.residual_fusion,
            &fallback,
        )
        .map_err(|e| StageError::Fatal(e.to_string()))?;
        // The step's model is kept in the artifact, and opened from there.
        let file = format!("step-{k}.onnx");
        super::write_file(&out.join(&file), &variant.encode_to_vec())?;
        let mut session = scorer.open_file(&out.join(&file))?;
        let validation_top1 = validation_top1(&mut session)?;
        let latency = engine::measure_latency(
            &mut session,
            first_image.view(),
            STEP_LATENCY_RUNS,
            STEP_LATENCY_RUNS,
            context.cancel,
        )?;
        let within_budget = fp32_validation_top1 - validation_top1 <= p.accuracy_budget + 1e-9;
        steps.push(Step {
            float_ops: float_ops.iter().cloned().collect(),
            validation_top1,
            test_top1: timed_test(&mut session)?,
            latency_ms: latency.p50_ms,
            model: file,
            within_budget,
        });
        walk.advance(1);
        if within_budget {
            break;
        }
    }
    let budget_met = steps.last().is_some_and(|s| s.within_budget);
    // Missed: the best validation top-1, the fewest ops in float on a tie.
    let chosen = if budget_met {
        steps.len() - 1
    } else {
        (0..steps.len())
            .fold(0, |best, i| if steps[i].validation_top1 > steps[best].validation_top1 { i } else { best })
    };
    let note = (!budget_met).then(|| {
        let best = &steps[chosen];
        format!(
            "the budget of {} points was not met with up to {max_float_layers} ops in float; returned the best step, {} in float, {:.2} points below fp32 on validation",
            p.accuracy_budget,
            best.float_ops.len(),
            fp32_validation_top1 - best.validation_top1
        )
    });
    if let Some(note) = &note {
        tracing::warn!("{note}");
    }
    let search = Search {
        accuracy_budget: p.accuracy_budget,
        max_float_layers,
        validation_images: context.prepared(task, "data")?.len(),
        fp32_validation_top1,
        fp32_test_top1,
        steps,
        chosen,
        budget_met,
        note,
        search_s: started.elapsed().as_secs_f64() - test_s,
        test_s,
    };
    super::write_file(&out.join(SEARCH), &serde_json::to_vec_pretty(&search).expect("a search serializes"))?;
    let step = search.chosen_step();
    Ok(json!({
        "budget_met": search.budget_met,
        "accuracy_budget": search.accuracy_budget,
        "float_ops": step.float_ops,
        "validation_top1": step.validation_top1,
        "fp32_validation_top1": search.fp32_validation_top1,
        "test_top1": step.test_top1,
        "steps": search.steps.len(),
        "note": search.note,
        "search_s": search.search_s,
        "test_s": search.test_s,
    }))
}

/// Top-1 in percent on the prepared set of input `role`, streamed a
/// batch at a time; none where it has no labels.
fn top1_of(
    task: &Task,
    context: &StageContext<'_>,
    role: &str,
    session: &mut InferenceSession,
) -> Result<Option<f64>, StageError> {
    let set = context.prepared(task, role)?;
    let Some(labels) = set.labels().map_err(|e| context.read_error(task, role, e))? else {
        return Ok(None);
    };
    let batches = set.batches(session.fixed_batch().unwrap_or(64)).map(|read| {
        let batch = read.map_err(|e| context.read_error(task, role, e))?;
        super::nchw(batch, role).map(ndarray::CowArray::from)
    });
    let accuracy = engine::accuracy_of_batches(session, batches, &labels, context.cancel)?;
    Ok(Some(100.0 * accuracy.top1))
}
