//! prepare-data: turns a role's source into the prepared data later
//! stages read (`data::prepared`: u8 pixels or the tensor file's own
//! type, in shards, normalised as they are read).
//!
//! One task of this stage exists per role and subset: the evaluation
//! images (`split: test`), the seeded calibration subset, sensitivity's
//! validation subset and, for QAT, the seeded training subset and its
//! validation subset. Each reads its own source: the IDX
//! dataset's split, an image folder, or a tensor file.
//!
//! Folder images are decoded and preprocessed a block at a time, in
//! parallel, and written as they come; tensor files are streamed a row at
//! a time. A split is never in memory whole, and this is the only stage
//! that decodes images: every later stage and run reads the shards.

use std::path::Path;
use std::sync::atomic::Ordering;

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{params, StageContext, StageError};
use crate::data::image;
use crate::data::prepared::{Normalize, ShardWriter, Stored};
use crate::data::source::{subset_indices, Source};
use crate::data::tensor_source::{Dtype, TensorError};
use crate::data::{self, Split};
use crate::plan::Task;
use crate::progress::Walk;
use crate::spec::{Color, Dataset, Layout, Preprocess};

pub const VERSION: u32 = 5;

/// Images decoded in parallel before they are written.
const BLOCK: usize = 256;

#[derive(Deserialize)]
struct Params {
    split: String,
    data: DataParams,
    source: Source,
    samples: Option<u32>,
    seed: Option<u64>,
    /// Other roles' subsets of the same source, which this one leaves
    /// out (sensitivity's validation subset holds out the calibration
    /// set; QAT's, the fine-tuning subset too).
    #[serde(default)]
    held_out: HeldOut,
}

/// One held-out draw (as sensitivity's validation subset names it) or several.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum HeldOut {
    #[default]
    None,
    One(Drawn),
    Many(Vec<Drawn>),
}

#[derive(Deserialize, Clone, Copy)]
struct Drawn {
    samples: u32,
    seed: u64,
}

impl HeldOut {
    fn draws(&self) -> Vec<(u32, u64)> {
        match self {
            HeldOut::None => Vec::new(),
            HeldOut::One(drawn) => vec![(drawn.samples, drawn.seed)],
            HeldOut::Many(drawn) => drawn.iter().map(|d| (d.samples, d.seed)).collect(),
        }
    }
}

/// The source indices of a drawn subset, in the order it was prepared,
/// so that which images a role used can be checked against another's.
pub const SOURCE_INDICES: &str = "source_indices.json";

/// Which of a source's samples a role takes.
#[derive(Clone)]
struct Draw {
    subset: Option<(u32, u64)>,
    held_out: Vec<(u32, u64)>,
}

impl Draw {
    /// The indices out of `population`; a subset larger than what it is
    /// drawn from is an error (validation refuses such specs up front).
    fn indices(&self, population: usize, out: &Path) -> Result<Vec<usize>, StageError> {
        let indices = subset_indices(population, self.subset, &self.held_out);
        if let Some((samples, _)) = self.subset.filter(|_| !self.held_out.is_empty()) {
            if indices.len() < samples as usize {
                return Err(StageError::Fatal(format!(
                    "a subset of {samples} is asked for, but the source holds {population} samples and only {} are left once other roles' subsets are held out",
                    indices.len()
                )));
            }
        }
        if self.subset.is_some() {
            let path = out.join(SOURCE_INDICES);
            super::write_file(&path, &serde_json::to_vec(&indices).expect("indices serialize"))?;
        }
        Ok(indices)
    }
}

#[derive(Deserialize)]
struct DataParams {
    dataset: Dataset,
    preprocess: Preprocess,
    color: Color,
    /// The (height, width) folder images are prepared at.
    image_size: Option<[u32; 2]>,
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let params: Params = params(task)?;
    let subset = params.samples.map(|samples| (samples, params.seed.unwrap_or(0)));
    let draw = Draw { subset, held_out: params.held_out.draws() };
    let count = match &params.source {
        Source::Idx { split, .. } => prepare_idx(context, &params.data, *split, &draw, out)?,
        Source::ImageFolder { .. } => prepare_folder(context, &params, &draw, out)?,
        Source::Tensors { .. } => prepare_tensors(context, &params, &draw, out)?,
    };
    let mut metrics = json!({"split": params.split, "count": count});
    if let Some((_, seed)) = subset {
        metrics["seed"] = json!(seed);
    }
    Ok(metrics)
}

fn prepare_idx(
    context: &StageContext<'_>,
    data: &DataParams,
    split: Split,
    draw: &Draw,
    out: &Path,
) -> Result<usize, StageError> {
    let raw = data::load_split(data.dataset, &context.sweep.data_dir, split)
        .map_err(|e| StageError::Fatal(format!("{e}\n  fix: {}", e.fix(data.dataset))))?;
    let indices = draw.indices(raw.count, out)?;
    let plane = raw.height * raw.width;
    let normalize = Normalize::new(&data.preprocess, 0);
    let mut shards = ShardWriter::create(out, Stored::U8, &[1, raw.height, raw.width], indices.len(), Some(normalize))?;
    let mut walk = Walk::new(context.report, "images", indices.len());
    for block in indices.chunks(BLOCK) {
        cancelled(context)?;
        for &index in block {
            shards.append(&raw.pixels[index * plane..(index + 1) * plane])?;
        }
        walk.advance(block.len());
    }
    let labels: Vec<i64> = indices.iter().map(|&i| i64::from(raw.labels[i])).collect();
    shards.finish(Some(&labels))?;
    Ok(indices.len())
}

fn prepare_folder(context: &StageContext<'_>, params: &Params, draw: &Draw, out: &Path) -> Result<usize, StageError> {
    let folder = params.source.folder().map_err(|e| StageError::Fatal(e.to_string()))?;
    let indices = draw.indices(folder.samples.len(), out)?;
    let preprocess = &params.data.preprocess;
    let [height, width] = params
        .data
        .image_size
        .ok_or_else(|| StageError::Fatal("the plan gives no image size (validation checks this)".into()))?;
    let channels = image::channels(params.data.color);
    let image_shape = match preprocess.layout {
        Layout::Nchw => [channels, height as usize, width as usize],
        Layout::Nhwc => [height as usize, width as usize, channels],
    };
    let normalize = Normalize::new(preprocess, preprocess.layout.channel_axis(3));
    let mut shards = ShardWriter::create(out, Stored::U8, &image_shape, indices.len(), Some(normalize))?;
    let mut walk = Walk::new(context.report, "images", indices.len());
    for block in indices.chunks(BLOCK) {
        cancelled(context)?;
        let prepared: Vec<Vec<u8>> = block
            .par_iter()
            .map(|&index| {
                let sample = &folder.samples[index];
                let pixels = image::prepare(&sample.path, preprocess, params.data.color)
                    .map_err(|e| StageError::Fatal(e.to_string()))?;
                if (pixels.height, pixels.width) != (height, width) {
                    return Err(StageError::Fatal(format!(
                        "{} is {}x{} after preprocessing, but the model takes {height}x{width}\n  fix: add data.preprocess.center_crop (or an exact resize [h, w]) so every image becomes {height}x{width}",
                        sample.path.display(),
                        pixels.height,
                        pixels.width
                    )));
                }
                Ok(image::in_layout(&pixels, preprocess.layout))
            })
            .collect::<Result<_, StageError>>()?;
        for pixels in &prepared {
            shards.append(pixels)?;
        }
        walk.advance(block.len());
    }
    let labels: Vec<i64> = indices.iter().map(|&index| folder.samples[index].label as i64).collect();
    shards.finish(Some(&labels))?;
    Ok(indices.len())
}

fn prepare_tensors(context: &StageContext<'_>, params: &Params, draw: &Draw, out: &Path) -> Result<usize, StageError> {
    let set = params.source.tensors().map_err(|e| StageError::Fatal(e.to_string()))?;
    let indices = draw.indices(set.len(), out)?;
    let preprocess = &params.data.preprocess;
    let normalize = Normalize::new(preprocess, preprocess.layout.channel_axis(set.sample_shape.len()));
    let labels: Option<Vec<i64>> = set.labels.as_ref().map(|labels| indices.iter().map(|&i| labels[i]).collect());
    let mut walk = Walk::new(context.report, "samples", indices.len());
    let mut step = |shards: &mut ShardWriter, bytes: &[u8]| -> Result<(), StageError> {
        walk.advance(1);
        if walk.done().is_multiple_of(BLOCK) {
            cancelled(context)?;
        }
        Ok(shards.append(bytes)?)
    };
    // Stored in the files' own type where they all share one; otherwise
    // as f32 model inputs (u8 ones normalised here, as they would be on read).
    let stored = match set.uniform_dtype() {
        Some(Dtype::U8) => Some((Stored::U8, Some(normalize.clone()))),
        Some(Dtype::F16) => Some((Stored::F16, None)),
        Some(Dtype::F32) => Some((Stored::F32, None)),
        _ => None,
    };
    let (dtype, on_read) = stored.clone().unwrap_or((Stored::F32, None));
    let mut shards = ShardWriter::create(out, dtype, &set.sample_shape, indices.len(), on_read)?;
    if stored.is_some() {
        let mut values = vec![0f32; set.sample_shape.iter().product()];
        set.read_raw_rows(&indices, |row| {
            row.to_f32(&mut values)?;
            step(&mut shards, row.bytes)
        })?;
    } else {
        set.read_rows(&indices, &normalize, |values| {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            step(&mut shards, &bytes)
        })?;
    }
    shards.finish(labels.as_deref())?;
    Ok(indices.len())
}

fn cancelled(context: &StageContext<'_>) -> Result<(), StageError> {
    match context.cancel.load(Ordering::Relaxed) {
        true => Err(StageError::Cancelled),
        false => Ok(()),
    }
}

impl From<TensorError> for StageError {
    fn from(error: TensorError) -> Self {
        StageError::Fatal(error.to_string())
    }
}
