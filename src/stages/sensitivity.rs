//! sensitivity: how much each quantized op costs, measured the way
//! fallback needs it: the model with every op quantized but that one,
//! against fp32, on a fixed seeded subset of the validation images.
//!
//! One pass per op, plus one for fp32 and one with everything quantized,
//! over the same images held in memory: at most (ops + 2) forward passes,
//! fewer where ops share a Q/DQ pair and so go to float together (one
//! variant, scored once). Each
//! variant is a Q/DQ model from the same calibrated ranges as the run's
//! build, opened on the CPU whatever the sweep's engine, since the ranking
//! is about numbers, not speed.
//!
//! The task's key holds the PTQ ancestry (model, calibration, method,
//! format, fusion) and the images, so every run that shares them, PTQ or
//! QAT, with any `float_layers`, reads one ranking.

use std::collections::BTreeSet;
use std::path::Path;

use ndarray::{Array2, Array4, ArrayView2, Axis};
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::build::{calibrated_ranges, Quantizer};
use super::calibrate::Statistics;
use super::{params, StageContext, StageError};
use crate::engine::{self, Agreement, InferenceSession};
use crate::plan::Task;
use crate::progress::Walk;
use crate::quant::qdq::{self, Fallback, QuantizedOp};
use crate::spec::Int8Format;

pub const VERSION: u32 = 1;

pub const RANKING: &str = "sensitivity.json";

/// Images per inference call of a pass.
const BATCH: usize = 64;

/// What names a PTQ ancestry's variants, in the sensitivity and fallback
/// stages' parameters alike.
#[derive(Deserialize)]
pub struct Ancestry {
    pub quantizer: Quantizer,
    pub format: Int8Format,
    pub percentile: Option<f64>,
    /// The output holding the scores [default: the first].
    #[serde(default)]
    pub output: Option<String>,
}

#[derive(Deserialize)]
struct Params {
    #[serde(flatten)]
    ancestry: Ancestry,
    /// Images scored: the first of the validation subset.
    samples: usize,
}

/// How far one model's outputs are from fp32's on the same images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// Share of images whose top-1 class is fp32's.
    pub agreement: f64,
    /// Mean KL divergence of the softmax outputs, fp32's against this
    /// model's, in nats.
    pub kl: f64,
    /// Mean SQNR of the logits against fp32's, in dB.
    pub sqnr_db: f64,
}

impl Divergence {
    /// `ours` against `fp32`, row by row.
    pub fn between(ours: ArrayView2<'_, f32>, fp32: ArrayView2<'_, f32>) -> Self {
        let mut agreement = Agreement::default();
        let mut kl = 0.0;
        for (q, r) in ours.outer_iter().zip(fp32.outer_iter()) {
            agreement.add(q, r);
            kl += kl_divergence(r.as_slice().expect("rows are contiguous"), q.as_slice().expect("rows are contiguous"));
        }
        Divergence {
            agreement: agreement.top1(),
            kl: kl / ours.nrows().max(1) as f64,
            sqnr_db: agreement.mean_sqnr_db(),
        }
    }
}

/// KL(softmax(p) || softmax(q)) of two rows of logits, in nats, computed
/// with log-softmax so large logits do not overflow.
fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |logits: &[f32]| -> Vec<f64> {
        let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let log_sum = logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        logits.iter().map(|&v| v as f64 - max - log_sum).collect()
    };
    let (log_p, log_q) = (log_softmax(p_logits), log_softmax(q_logits));
    log_p.iter().zip(&log_q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum::<f64>().max(0.0)
}

/// One quantized op, and the model with only that op restored to float.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpSensitivity {
    #[serde(flatten)]
    pub op: QuantizedOp,
    /// The ops in float when this one is (`qdq::float_closure`): itself,
    /// and any op that reads one of its inputs through the same Q/DQ pair.
    pub float_ops: Vec<String>,
    /// The model with every other op quantized, against fp32.
    pub restored: Divergence,
}

/// The sensitivity stage's artifact: ops most sensitive first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    pub samples: usize,
    /// Every op quantized, against fp32.
    pub quantized: Divergence,
    /// Most sensitive first: restoring the first to float brings the
    /// model closest to fp32 (lowest KL; SQNR breaks ties).
    pub ops: Vec<OpSensitivity>,
    pub forward_passes: usize,
    /// Seconds spent in forward passes, and in the whole stage.
    pub inference_s: f64,
    pub total_s: f64,
}

impl Ranking {
    pub fn read(dir: &Path) -> Result<Self, StageError> {
        super::read_json(dir, RANKING)
    }

    /// The ops in float for `float_layers: k`: each row's ops, most
    /// sensitive first, as long as they keep the total at most `k`. That is
    /// exactly `k` unless the rows that would fill it each bring more
    /// (ops that share a Q/DQ pair go to float together).
    pub fn most_sensitive(&self, k: usize) -> BTreeSet<String> {
        let mut chosen = BTreeSet::new();
        for row in &self.ops {
            if chosen.len() == k {
                break;
            }
            let with: BTreeSet<String> = chosen.iter().chain(&row.float_ops).cloned().collect();
            if with.len() <= k {
                chosen = with;
            }
        }
        chosen
    }
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let started = std::time::Instant::now();
    let Params { ancestry: p, samples } = params(task)?;
    let mut scorer = Scorer::new(task, context, p.output.as_deref());
    let statistics = Statistics::read(&context.input_dir(task, "calibration")?)?;
    let ranges = calibrated_ranges(&statistics, p.quantizer.calibration, p.percentile);
    let model = context.load_model(task)?;
    let graph = model.proto.graph.as_ref().expect("a loaded model has a graph");
    let ops = qdq::quantized_ops(graph, p.format, p.quantizer.residual_fusion);
    let images = scorer.first_images(samples)?;

    let mut walk = Walk::new(context.report, "passes", ops.len() + 2);
    let fp32 = scorer.scores(&model.proto, &images, out)?;
    walk.advance(1);
    let variant = |float: BTreeSet<String>| -> Result<candle_onnx::onnx::ModelProto, StageError> {
        let fallback = Fallback { ops: float, ..Default::default() };
        qdq::quantize_except(&model.proto, &ranges, p.format, p.quantizer.residual_fusion, &fallback)
            .map(|(model, _)| model)
            .map_err(|e| StageError::Fatal(e.to_string()))
    };
    let quantized = Divergence::between(scorer.scores(&variant(BTreeSet::new())?, &images, out)?.view(), fp32.view());
    walk.advance(1);
    // Ops that go to float together are one variant, scored once.
    let mut scored: Vec<(BTreeSet<String>, Divergence)> = Vec::new();
    let mut rows = Vec::with_capacity(ops.len());
    for op in ops {
        let float =
            qdq::float_closure(graph, p.format, p.quantizer.residual_fusion, &BTreeSet::from([op.name.clone()]));
        let restored = match scored.iter().find(|(ops, _)| *ops == float) {
            Some((_, divergence)) => *divergence,
            None => {
                let scores = scorer.scores(&variant(float.clone())?, &images, out)?;
                let divergence = Divergence::between(scores.view(), fp32.view());
                scored.push((float.clone(), divergence));
                divergence
            }
        };
        rows.push(OpSensitivity { op, float_ops: float.into_iter().collect(), restored });
        walk.advance(1);
    }
    rows.sort_by(|a, b| {
        a.restored.kl.total_cmp(&b.restored.kl).then(b.restored.sqnr_db.total_cmp(&a.restored.sqnr_db))
    });
    let ranking = Ranking {
        samples: images.shape()[0],
        quantized,
        forward_passes: scorer.passes,
        inference_s: scorer.inference_s,
        total_s: started.elapsed().as_secs_f64(),
        ops: rows,
    };
    super::write_file(&out.join(RANKING), &serde_json::to_vec_pretty(&ranking).expect("a ranking serializes"))?;
    Ok(json!({
        "samples": ranking.samples,
        "ops": ranking.ops.len(),
        "quantized": ranking.quantized,
        "most_sensitive": ranking.ops.iter().take(5).map(|o| json!({"op": o.op.name, "restored": o.restored})).collect::<Vec<_>>(),
        "forward_passes": ranking.forward_passes,
        "inference_s": ranking.inference_s,
        "total_s": ranking.total_s,
    }))
}

/// Runs model variants over images held in memory, on the CPU, counting
/// the passes and the time they take.
pub struct Scorer<'a> {
    task: &'a Task,
    context: &'a StageContext<'a>,
    output: Option<&'a str>,
    threads: usize,
    pub passes: usize,
    pub inference_s: f64,
}

impl<'a> Scorer<'a> {
    pub fn new(task: &'a Task, context: &'a StageContext<'a>, output: Option<&'a str>) -> Self {
        Self { task, context, output, threads: engine::resolve_threads(0), passes: 0, inference_s: 0.0 }
    }

    /// The first `count` images of the `data` input; more than it holds is an error.
    pub fn first_images(&self, count: usize) -> Result<Array4<f32>, StageError> {
        let set = self.context.prepared(self.task, "data")?;
        if count > set.len() {
            return Err(StageError::Fatal(format!(
                "sensitivity scores {count} images but the validation subset holds {} (validation checks this)",
                set.len()
            )));
        }
        let indices: Vec<usize> = (0..count).collect();
        let batch = set.read(&indices).map_err(|e| self.context.read_error(self.task, "data", e))?;
        super::nchw(batch, "validation")
    }

    /// Opens `model` (written to a scratch file in `scratch`, as ONNX
    /// Runtime opens files).
    pub fn open(&self, model: &candle_onnx::onnx::ModelProto, scratch: &Path) -> Result<InferenceSession, StageError> {
        let path = scratch.join(".variant.onnx");
        super::write_file(&path, &model.encode_to_vec())?;
        let session = self.open_file(&path);
        std::fs::remove_file(&path).map_err(super::io_at(&path))?;
        session
    }

    /// Opens a model already written to `path`.
    pub fn open_file(&self, path: &Path) -> Result<InferenceSession, StageError> {
        let mut session = InferenceSession::open(path, self.threads, None)?;
        if let Some(output) = self.output {
            session.score_with(output).map_err(|e| StageError::Fatal(e.to_string()))?;
        }
        Ok(session)
    }

    /// `model`'s scores on `images`, one forward pass.
    pub fn scores(
        &mut self,
        model: &candle_onnx::onnx::ModelProto,
        images: &Array4<f32>,
        scratch: &Path,
    ) -> Result<Array2<f32>, StageError> {
        let mut session = self.open(model, scratch)?;
        self.pass(&mut session, images)
    }

    /// One forward pass of an open session over `images`.
    pub fn pass(&mut self, session: &mut InferenceSession, images: &Array4<f32>) -> Result<Array2<f32>, StageError> {
        let started = std::time::Instant::now();
        let mut rows = Vec::with_capacity(images.shape()[0]);
        // A model whose batch axis is fixed takes batches of that size.
        let batch_size = session.fixed_batch().unwrap_or(BATCH);
        for batch in images.axis_chunks_iter(Axis(0), batch_size) {
            if self.context.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StageError::Cancelled);
            }
            rows.push(session.run(batch)?);
        }
        self.passes += 1;
        self.inference_s += started.elapsed().as_secs_f64();
        let views: Vec<ArrayView2<'_, f32>> = rows.iter().map(|r| r.view()).collect();
        ndarray::concatenate(Axis(0), &views).map_err(|e| StageError::Fatal(format!("scores of uneven width: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn identical_scores_diverge_by_nothing_and_a_flipped_class_is_seen() {
        let fp32 = array![[4.0f32, 1.0, 0.0], [0.0, 3.0, 1.0]];
        let same = Divergence::between(fp32.view(), fp32.view());
        assert_eq!(same.agreement, 1.0);
        assert!(same.kl.abs() < 1e-12);
        assert_eq!(same.sqnr_db, engine::SQNR_CAP_DB);

        let flipped = array![[1.0f32, 4.0, 0.0], [0.0, 3.0, 1.0]];
        let apart = Divergence::between(flipped.view(), fp32.view());
        assert_eq!(apart.agreement, 0.5);
        // Row 0: p = softmax(4, 1, 0) against q = softmax(1, 4, 0).
        let p = [4.0f64, 1.0, 0.0].map(f64::exp);
        let q = [1.0f64, 4.0, 0.0].map(f64::exp);
        let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
        let expected: f64 = (0..3).map(|i| p[i] / sp * ((p[i] / sp) / (q[i] / sq)).ln()).sum::<f64>() / 2.0;
        assert!((apart.kl - expected).abs() < 1e-9, "{} vs {expected}", apart.kl);
    }
}
