//! evaluate: top-1 accuracy on the whole test split, then latency and
//! throughput at each configured batch size, recorded with the thread
//! count, engine, ONNX Runtime version and machine that produced them.
//!
//! Samples without labels are measured against fp32 instead: fp32's
//! evaluation keeps its scores (`logits.npy`, streamed as they come), and
//! every other run's evaluation reads them as its `reference` input and
//! reports the share of samples whose top-1 matches and the mean SQNR.

use std::path::Path;

use ndarray::{s, CowArray, Ix4};
use serde::Deserialize;
use serde_json::{json, Value};

use std::sync::Arc;

use super::{build, params, StageContext, StageError};
use crate::data::prepared::PreparedSet;
use crate::data::tensor_file::{NpyBatches, NpyRowWriter};
use crate::engine::{self, InferenceSession, Provider};
use crate::plan::{Task, REFERENCE};
use crate::progress::Walk;
use crate::spec::Engine;

pub const VERSION: u32 = 3;

/// fp32's scores on unlabelled samples, [samples, classes] f32.
pub const LOGITS: &str = "logits.npy";

#[derive(Deserialize)]
struct Params {
    batch_sizes: Vec<usize>,
    warmup: usize,
    iterations: usize,
    threads: u32,
    engine: Engine,
    #[serde(default)]
    keep_logits: bool,
    /// The output holding the scores [default: the first].
    #[serde(default)]
    output: Option<String>,
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let p: Params = params(task)?;
    let build_dir = context.input_dir(task, "model")?;
    let model = build_dir.join(build::ENGINE_MODEL);
    let int8 = task
        .input("model")
        .and_then(|key| context.results.manifest(key))
        .is_some_and(|m| m.metrics["precision"] == "int8");
    let provider = Provider::for_engine(p.engine, int8, &build_dir);
    let images = Images { set: context.prepared(task, "data")?, task, context };
    let count = images.set.len();

    let threads = engine::resolve_threads(p.threads);
    let mut session = InferenceSession::open_with(&model, threads, None, &provider)?;
    if let Some(output) = &p.output {
        session.score_with(output).map_err(|e| StageError::Fatal(e.to_string()))?;
    }
    let accuracy_batch = p.batch_sizes.iter().copied().max().unwrap_or(1);

    // Latency first, on the first images (only as many as the largest
    // batch are read): its warm-up also warms the session, so that the
    // accuracy pass's time is the pass alone, as peers time theirs.
    let first = images.first(accuracy_batch)?;
    let mut latency = Vec::new();
    for &batch in &p.batch_sizes {
        let rows = batch.min(first.shape()[0]);
        let input = first.slice(s![..rows, .., .., ..]);
        latency.push(engine::measure_latency(&mut session, input, p.warmup, p.iterations, context.cancel)?);
    }
    drop(first);

    let started = std::time::Instant::now();
    let labels = images.set.labels().map_err(|e| context.read_error(task, "data", e))?;
    let mut quality = if let Some(labels) = labels {
        let accuracy =
            engine::accuracy_of_batches(&mut session, images.batches(accuracy_batch)?, &labels, context.cancel)?;
        json!({"accuracy": accuracy.top1, "top5": accuracy.top5})
    } else {
        against_reference(task, context, &mut session, (&images, count), accuracy_batch, p.keep_logits, out)?
    };
    let accuracy_pass_s = started.elapsed().as_secs_f64();

    quality.as_object_mut().expect("an object").extend(
        json!({
            "test_images": count,
            "fixed_batch": session.fixed_batch(),
            "accuracy_batch": accuracy_batch,
            "accuracy_pass_s": accuracy_pass_s,
            "latency": latency,
            "threads": threads,
            "engine": p.engine,
            "onnxruntime": engine::runtime()?.version,
            "machine": machine(),
        })
        .as_object()
        .expect("an object")
        .clone(),
    );
    Ok(quality)
}

/// Unlabelled samples: keeps the scores (fp32), or compares them with the
/// `reference` evaluation's (every other run).
fn against_reference(
    task: &Task,
    context: &StageContext<'_>,
    session: &mut InferenceSession,
    (images, count): (&Images<'_>, usize),
    batch: usize,
    keep_logits: bool,
    out: &Path,
) -> Result<Value, StageError> {
    let mut kept: Option<NpyRowWriter> = None;
    let ours_path = out.join(LOGITS);
    // fp32's kept logits, and where they are read from.
    let mut reference = match task.input(REFERENCE) {
        Some(_) => {
            let path = context.input_dir(task, REFERENCE)?.join(LOGITS);
            Some((NpyBatches::open(&path, batch).map_err(super::io_at(&path))?, path))
        }
        None => None,
    };
    let mut agreement = engine::Agreement::default();
    engine::for_each_scores(session, images.batches(batch)?, context.cancel, |scores| -> Result<(), StageError> {
        if keep_logits {
            let writer = match &mut kept {
                Some(writer) => writer,
                None => kept.insert(
                    NpyRowWriter::create(&ours_path, &[count, scores.shape()[1]]).map_err(super::io_at(&ours_path))?,
                ),
            };
            writer
                .append(scores.as_standard_layout().as_slice().expect("standard layout"))
                .map_err(super::io_at(&ours_path))?;
        }
        if let Some((batches, path)) = &mut reference {
            let theirs = batches.next().ok_or_else(|| StageError::Fatal(format!("{} ends early", path.display())))?;
            let theirs = theirs.map_err(super::io_at(path))?;
            if theirs.shape() != scores.shape() {
                return Err(StageError::Fatal(format!(
                    "fp32's logits are {:?} for this batch, these are {:?}",
                    theirs.shape(),
                    scores.shape()
                )));
            }
            for (ours, fp32) in scores.outer_iter().zip(theirs.outer_iter()) {
                agreement.add(ours, fp32.into_dimensionality().expect("rows of a 2-D array"));
            }
        }
        Ok(())
    })?;
    if let Some(writer) = kept {
        writer.finish().map_err(super::io_at(&ours_path))?;
    }
    Ok(match reference {
        Some(_) => json!({"labelled": false, "agreement": agreement.top1(), "logit_sqnr_db": agreement.mean_sqnr_db()}),
        None => json!({"labelled": false, "agreement": 1.0}),
    })
}

/// The prepared test images, read a batch at a time ahead of the
/// session (`PreparedSet::batches`), so memory holds a few batches, never
/// the split, and reading overlaps inference.
struct Images<'a> {
    set: Arc<PreparedSet>,
    task: &'a Task,
    context: &'a StageContext<'a>,
}

impl Images<'_> {
    /// Every image in order, the walk shown as it goes.
    fn batches(
        &self,
        batch: usize,
    ) -> Result<impl Iterator<Item = Result<CowArray<'static, f32, Ix4>, StageError>> + '_, StageError> {
        let mut walk = Walk::new(self.context.report, "images", self.set.len());
        Ok(self.set.batches(batch).map(move |read| {
            let batch = read.map_err(|e| self.context.read_error(self.task, "data", e))?;
            walk.advance(batch.shape()[0]);
            Self::nchw(batch)
        }))
    }

    /// The first `count` images (fewer if the split is smaller).
    fn first(&self, count: usize) -> Result<ndarray::Array4<f32>, StageError> {
        let indices: Vec<usize> = (0..count.min(self.set.len())).collect();
        if indices.is_empty() {
            return Err(StageError::Fatal("no test images".into()));
        }
        let batch = self.set.read(&indices).map_err(|e| self.context.read_error(self.task, "data", e))?;
        Ok(Self::nchw(batch)?.into_owned())
    }

    fn nchw(batch: ndarray::ArrayD<f32>) -> Result<CowArray<'static, f32, Ix4>, StageError> {
        super::nchw(batch, "test").map(CowArray::from)
    }
}

/// A short description of the machine, since latency means nothing without it.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(1, usize::from),
        "host": host,
        "os": std::env::consts::OS,
    })
}
