//! calibrate: one pass of the fp32 model over the calibration set, with
//! every tensor the Q/DQ rewrite may quantize exposed as a graph output,
//! streamed batch by batch into histograms. Memory is bounded by the
//! histograms, not by the number of samples: nothing is kept per batch.
//!
//! One task serves every calibration method and both fusion settings: the
//! artifact holds the histogram and running max of each tensor, and the
//! build stage derives each method's amax from it.
//!
//! It also records what the histograms cannot tell afterwards and the
//! report's calibration health reads (`quant::health`): each tensor's
//! producer, its max before the last batch and per channel, and a lint of
//! the images themselves (duplicates, constant images, class counts).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_onnx::onnx::{type_proto, ModelProto, TensorShapeProto, TypeProto, ValueInfoProto};
use ndarray::{ArrayD, ArrayView3};
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{StageContext, StageError};
use crate::engine::{self, InferenceSession};
use crate::onnx;
use crate::onnx::graph::{node_name, GraphIndex};
use crate::plan::Task;
use crate::progress::Walk;
use crate::quant::health::{Measured, Producer, SetLint};
use crate::quant::histogram::{Histogram, INITIAL_BINS};
use crate::quant::qdq;

pub const VERSION: u32 = 3;

pub const STATISTICS: &str = "histograms.json";

/// Batch size of the pass for small inputs; any size works, ragged last
/// batch included.
const MAX_BATCH: usize = 64;
/// Input values per batch: every exposed activation of a batch is alive at
/// once, so large inputs (224x224 and up) get smaller batches.
const BATCH_INPUT_VALUES: usize = 1 << 20;

/// What the calibrate stage measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Statistics {
    pub samples: usize,
    pub tensors: Vec<TensorStatistics>,
    /// None in files written before version 3.
    #[serde(default)]
    pub lint: Option<SetLint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorStatistics {
    pub name: String,
    /// Shape of one sample of the tensor (batch axis removed).
    pub shape: Vec<usize>,
    pub histogram: Histogram,
    /// The node that writes it; None for a graph input.
    #[serde(default)]
    pub producer: Option<Producer>,
    /// The running max of |x| before the last batch, so the report can
    /// tell whether the last batch still grew the range (a set too small
    /// to have seen it). None after a single batch.
    #[serde(default)]
    pub max_before_last_batch: Option<f32>,
    /// Max of |x| per channel (axis 1), which names dead channels by
    /// index; empty for tensors of rank below 2.
    #[serde(default)]
    pub channel_max: Vec<f32>,
}

impl TensorStatistics {
    /// What calibration health reads of this tensor.
    pub fn measured(&self) -> Measured<'_> {
        Measured {
            name: &self.name,
            producer: self.producer.as_ref(),
            histogram: &self.histogram,
            max_before_last_batch: self.max_before_last_batch,
            channel_max: &self.channel_max,
        }
    }
}

impl Statistics {
    pub fn read(dir: &Path) -> Result<Self, StageError> {
        super::read_json(dir, STATISTICS)
    }
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let model = context.load_model(task)?;
    let set = context.prepared(task, "data")?;
    let per_sample: usize = set.sample_shape().iter().product();
    let batch = (BATCH_INPUT_VALUES / per_sample.max(1)).clamp(1, MAX_BATCH);
    let mut walk = Walk::new(context.report, "images", set.len());
    let batches = set.batches(batch).map(|read| read.map_err(|e| context.read_error(task, "data", e)));
    let mut statistics =
        collect(&model.proto, out, engine::resolve_threads(0), batches, context.cancel, |n| walk.advance(n))?;
    let labels = set.labels().map_err(|e| context.read_error(task, "data", e))?;
    if let (Some(lint), Some(labels)) = (statistics.lint.as_mut(), labels) {
        lint.class_counts = Some(class_counts(&labels));
    }

    let warnings = warnings(statistics.samples, &statistics.tensors);
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    super::write_file(&out.join(STATISTICS), &serde_json::to_vec(&statistics).expect("statistics serialize"))?;
    Ok(json!({
        "samples": statistics.samples,
        "tensors": statistics.tensors.len(),
        "dead_tensors": statistics.tensors.iter().filter(|t| t.histogram.is_dead()).map(|t| &t.name).collect::<Vec<_>>(),
        "warnings": warnings,
    }))
}

/// One pass of `model` over `batches`, streaming every tensor the Q/DQ
/// rewrite may quantize into a histogram. `scratch` holds the exposed model
/// briefly, as ONNX Runtime opens models from files.
pub fn collect<E>(
    model: &ModelProto,
    scratch: &Path,
    threads: usize,
    batches: impl Iterator<Item = Result<ArrayD<f32>, E>>,
    cancel: &AtomicBool,
    mut on_batch: impl FnMut(usize),
) -> Result<Statistics, StageError>
where
    StageError: From<E>,
{
    let graph = model.graph.as_ref().expect("a loaded model has a graph");
    let names = qdq::calibration_tensors(graph);
    if names.is_empty() {
        return Err(StageError::Fatal(qdq::QdqError::NothingToQuantize.to_string()));
    }
    let index = GraphIndex::new(graph);
    let producer = |name: &str| {
        index.producer_index(name).map(|i| {
            let node = &graph.node[i];
            Producer { node: node_name(node, i), op: node.op_type.clone() }
        })
    };

    // The same model with every tensor to measure exposed as an output.
    let mut exposed = model.clone();
    let exposed_graph = exposed.graph.as_mut().expect("a loaded model has a graph");
    for name in &names {
        if !exposed_graph.output.iter().any(|o| &o.name == name) {
            exposed_graph.output.push(float_output(name));
        }
    }
    let exposed_path = scratch.join(".exposed.onnx");
    super::write_file(&exposed_path, &exposed.encode_to_vec())?;
    let session = InferenceSession::open(&exposed_path, threads, None);
    std::fs::remove_file(&exposed_path).map_err(super::io_at(&exposed_path))?;
    let mut session = session?;

    let slots: Vec<Option<usize>> = session.output_names().iter().map(|o| names.iter().position(|n| n == o)).collect();
    let mut tensors: Vec<TensorStatistics> = names
        .iter()
        .map(|name| TensorStatistics {
            name: name.clone(),
            shape: Vec::new(),
            histogram: Histogram::new(),
            producer: producer(name),
            max_before_last_batch: None,
            channel_max: Vec::new(),
        })
        .collect();
    let mut samples = 0;
    let mut lint = Linter::default();
    for batch in batches {
        if cancel.load(Ordering::Relaxed) {
            return Err(StageError::Cancelled);
        }
        let batch = super::nchw(batch?, "calibration")?;
        if samples > 0 {
            // Every batch may be the last; the max before it is what the
            // last one is measured against.
            for tensor in &mut tensors {
                tensor.max_before_last_batch = Some(tensor.histogram.max);
            }
        }
        for image in batch.outer_iter() {
            lint.add(image);
        }
        samples += batch.shape()[0];
        on_batch(batch.shape()[0]);
        // A model whose batch axis is fixed takes the batch in slices of that size.
        let slice = session.fixed_batch().unwrap_or(batch.shape()[0]).max(1);
        for sub_batch in batch.axis_chunks_iter(ndarray::Axis(0), slice) {
            let failure = session.run_outputs(sub_batch, |outputs| {
                // Each tensor's histogram is updated by one thread; tensors are
                // dealt round-robin to as many threads as ONNX Runtime uses.
                let mut work: Vec<(&mut TensorStatistics, &engine::Output<'_>)> = Vec::new();
                let mut remaining: Vec<Option<&mut TensorStatistics>> = tensors.iter_mut().map(Some).collect();
                for output in outputs {
                    if let Some(stats) = slots[output.index].and_then(|slot| remaining[slot].take()) {
                        work.push((stats, output));
                    }
                }
                let lanes = threads.max(1);
                let mut per_lane: Vec<Vec<(&mut TensorStatistics, &engine::Output<'_>)>> =
                    (0..lanes).map(|_| Vec::new()).collect();
                for (i, item) in work.into_iter().enumerate() {
                    per_lane[i % lanes].push(item);
                }
                std::thread::scope(|scope| {
                    let handles: Vec<_> = per_lane
                        .into_iter()
                        .map(|lane| {
                            scope.spawn(move || lane.into_iter().find_map(|(stats, output)| update(stats, output)))
                        })
                        .collect();
                    handles.into_iter().find_map(|h| h.join().expect("a histogram thread panicked"))
                })
            })?;
            if let Some(message) = failure {
                return Err(StageError::Fatal(message));
            }
        }
    }
    Ok(Statistics { samples, tensors, lint: Some(lint.counts) })
}

/// Counts duplicate and constant images as they stream past, keeping a
/// 128-bit digest per distinct image rather than the image.
#[derive(Default)]
struct Linter {
    seen: HashSet<[u8; 16]>,
    counts: SetLint,
    bytes: Vec<u8>,
}

impl Linter {
    /// One image, channels first.
    fn add(&mut self, image: ArrayView3<'_, f32>) {
        self.bytes.clear();
        self.bytes.extend(image.iter().flat_map(|v| v.to_le_bytes()));
        let digest: [u8; 32] = Sha256::digest(&self.bytes).into();
        if !self.seen.insert(digest[..16].try_into().expect("16 of 32 bytes")) {
            self.counts.duplicates += 1;
        }
        let flat = |plane: ndarray::ArrayView2<'_, f32>| {
            let first = plane.first().copied();
            plane.iter().all(|&v| Some(v) == first)
        };
        if image.outer_iter().all(flat) {
            self.counts.constant += 1;
        }
    }
}

fn class_counts(labels: &[i64]) -> BTreeMap<i64, u64> {
    let mut counts = BTreeMap::new();
    for &label in labels {
        *counts.entry(label).or_insert(0) += 1;
    }
    counts
}

/// Adds one batch of a tensor to its statistics; the error message if the
/// batch holds NaN or infinity.
fn update(stats: &mut TensorStatistics, output: &engine::Output<'_>) -> Option<String> {
    stats.shape = output.shape.iter().skip(1).copied().collect();
    track_channel_max(&mut stats.channel_max, &output.shape, output.values);
    stats.histogram.add(output.values).err().map(|bad| {
        format!(
            "tensor `{}` holds {} NaN or infinite value(s) on the calibration set; check the model and data.preprocess",
            stats.name, bad.count
        )
    })
}

/// Raises each channel's (axis 1) running max of |x| to this batch's.
fn track_channel_max(channel_max: &mut Vec<f32>, shape: &[usize], values: &[f32]) {
    let Some(&channels) = shape.get(1) else {
        return;
    };
    if channels == 0 {
        return;
    }
    channel_max.resize(channels, 0.0);
    let inner: usize = shape[2..].iter().product();
    for (run, plane) in values.chunks(inner.max(1)).enumerate() {
        let max = plane.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let slot = &mut channel_max[run % channels];
        *slot = slot.max(max);
    }
}

/// A graph output declaration for an intermediate float tensor; ONNX
/// Runtime infers its shape.
fn float_output(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: onnx::FLOAT,
                shape: None::<TensorShapeProto>,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Calibration sets too small to fill a histogram give amax values that
/// move from seed to seed; say so rather than fail.
fn warnings(samples: usize, tensors: &[TensorStatistics]) -> Vec<String> {
    let mut out = Vec::new();
    if samples < 100 {
        out.push(format!(
            "only {samples} calibration samples; amax values will be noisy (NVIDIA's flow uses about 500)"
        ));
    }
    for t in tensors {
        let values = t.histogram.total();
        if values > 0 && values < (INITIAL_BINS * 10) as u64 {
            out.push(format!(
                "tensor `{}` has only {values} calibration values for {INITIAL_BINS} histogram bins; use more calibration samples",
                t.name
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: usize) -> TensorStatistics {
        let mut histogram = Histogram::new();
        histogram.add(&vec![1.0; values]).unwrap();
        TensorStatistics {
            name: "t".into(),
            shape: vec![values],
            histogram,
            producer: None,
            max_before_last_batch: None,
            channel_max: Vec::new(),
        }
    }

    #[test]
    fn small_calibration_sets_are_warned_about() {
        let few = warnings(20, &[tensor(1000)]);
        assert_eq!(few.len(), 2, "{few:?}");
        assert!(few[0].contains("only 20 calibration samples"));
        assert!(few[1].contains("tensor `t` has only 1000 calibration values"));
        assert!(warnings(500, &[tensor(1 << 20)]).is_empty());
    }

    /// Exact repeats count once each after the first; an image is
    /// constant when each channel is flat, whatever normalisation did to
    /// the channels.
    #[test]
    fn the_lint_counts_duplicates_and_constant_images() {
        let varied =
            |seed: f32| ndarray::Array3::from_shape_fn((3, 4, 4), |(c, y, x)| seed + (c * 16 + y * 4 + x) as f32);
        let solid = ndarray::Array3::from_shape_fn((3, 4, 4), |(c, _, _)| -(c as f32) / 0.3);
        let mut lint = Linter::default();
        for image in [varied(0.0), varied(1.0), varied(0.0), solid.clone(), varied(0.0), solid] {
            lint.add(image.view());
        }
        assert_eq!(lint.counts, SetLint { duplicates: 3, constant: 2, class_counts: None });
        assert_eq!(lint.seen.len(), 3, "one digest per distinct image");
    }

    #[test]
    fn channel_max_follows_axis_one() {
        let mut max = Vec::new();
        // Two samples of two channels of two values.
        track_channel_max(&mut max, &[2, 2, 2], &[1.0, -3.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]);
        assert_eq!(max, [3.0, 0.0]);
        track_channel_max(&mut max, &[1, 2], &[-0.5, 2.0]);
        assert_eq!(max, [3.0, 2.0]);
    }

    #[test]
    fn class_counts_count_each_label() {
        assert_eq!(class_counts(&[2, 0, 2, 2]), BTreeMap::from([(0, 1), (2, 3)]));
    }

    /// A version 2 file reads, with the health fields empty.
    #[test]
    fn statistics_without_health_fields_still_read() {
        let old = r#"{"samples": 3, "tensors": [{"name": "t", "shape": [1],
            "histogram": {"bin_width": 0.0, "counts": [], "max": 0.0, "pending_zeros": 3}}]}"#;
        let statistics: Statistics = serde_json::from_str(old).unwrap();
        assert!(statistics.lint.is_none());
        let t = &statistics.tensors[0];
        assert!(t.producer.is_none() && t.max_before_last_batch.is_none() && t.channel_max.is_empty());
    }
}
