//! prepare-data: turns a role's source into the tensors later stages read.
//!
//! Up to three tasks of this stage exist per sweep, one per role: the
//! evaluation images (`split: test`), the seeded calibration subset, and,
//! for QAT, the seeded training subset. Each reads its own source: the IDX
//! dataset's split, or an image folder. Images go to `images.npy` (f32, the
//! model's layout) and labels to `labels.npy` (i64, as PyTorch keeps
//! them). The IDX calibration set is also written as a PyTorch .pt dict
//! (`images`, `labels`), the form NVIDIA's PTQ flow prepares, so a PyTorch
//! user can calibrate on exactly the same images.
//!
//! Folder images are decoded and preprocessed a block at a time, in
//! parallel, and written as they come; tensor files are streamed a row at
//! a time. A split is never in memory whole. A tensor source without
//! labels (calibration needs none) writes no `labels.npy`.

use std::path::Path;
use std::sync::atomic::Ordering;

use ndarray::Array1;
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{params, StageContext, StageError};
use crate::data::image;
use crate::data::source::{subset_indices, Source};
use crate::data::tensor_file::{self, NpyRowWriter, PtTensor};
use crate::data::tensor_source::{Scaling, TensorError};
use crate::data::{self, Split};
use crate::plan::Task;
use crate::spec::{Color, Dataset, Layout, Preprocess};

pub const VERSION: u32 = 2;

pub const IMAGES: &str = "images.npy";
pub const LABELS: &str = "labels.npy";
pub const CALIBRATION_PT: &str = "calibration.pt";

/// Images decoded in parallel before they are written.
const BLOCK: usize = 256;

#[derive(Deserialize)]
struct Params {
    split: String,
    data: DataParams,
    source: Source,
    samples: Option<u32>,
    seed: Option<u64>,
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
    let count = match &params.source {
        Source::Idx { split, .. } => {
            prepare_idx(context, &params.data, *split, subset, params.split == "calibration", out)?
        }
        Source::ImageFolder { .. } => prepare_folder(context, &params, subset, out)?,
        Source::Tensors { .. } => prepare_tensors(context, &params, subset, out)?,
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
    subset: Option<(u32, u64)>,
    with_pt: bool,
    out: &Path,
) -> Result<usize, StageError> {
    let raw = data::load_split(data.dataset, &context.sweep.data_dir, split)
        .map_err(|e| StageError::Fatal(format!("{e}\n  fix: {}", e.fix(data.dataset))))?;
    let indices = subset.map(|_| subset_indices(raw.count, subset));
    let tensors = raw.preprocess(&data.preprocess, indices.as_deref());
    let labels = &tensors.labels;
    tensor_file::write_npy(&out.join(IMAGES), &tensors.images.view().into_dyn())?;
    tensor_file::write_npy(&out.join(LABELS), &labels.view().into_dyn())?;
    if with_pt {
        tensor_file::write_pt(
            &out.join(CALIBRATION_PT),
            &[
                ("images", PtTensor::F32(tensors.images.view().into_dyn())),
                ("labels", PtTensor::I64(labels.view().into_dyn())),
            ],
        )?;
    }
    Ok(labels.len())
}

fn prepare_folder(
    context: &StageContext<'_>,
    params: &Params,
    subset: Option<(u32, u64)>,
    out: &Path,
) -> Result<usize, StageError> {
    let folder = params.source.folder().map_err(|e| StageError::Fatal(e.to_string()))?;
    let indices = subset_indices(folder.samples.len(), subset);
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
    let per_image: usize = image_shape.iter().product();
    let shape = [&[indices.len()][..], &image_shape[..]].concat();
    let mut images = NpyRowWriter::create(&out.join(IMAGES), &shape)?;
    let mut labels = Vec::with_capacity(indices.len());
    for (done, block) in indices.chunks(BLOCK).enumerate() {
        if context.cancel.load(Ordering::Relaxed) {
            return Err(StageError::Cancelled);
        }
        let prepared: Vec<Vec<f32>> = block
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
                let mut values = vec![0.0; per_image];
                image::normalize(&pixels, preprocess, preprocess.layout, &mut values);
                Ok(values)
            })
            .collect::<Result<_, StageError>>()?;
        for values in &prepared {
            images.append(values)?;
        }
        labels.extend(block.iter().map(|&index| folder.samples[index].label as i64));
        (context.report)(&format!("{} of {} images", (done * BLOCK + block.len()), indices.len()));
    }
    images.finish()?;
    tensor_file::write_npy(&out.join(LABELS), &Array1::from(labels).view().into_dyn())?;
    Ok(indices.len())
}

fn prepare_tensors(
    context: &StageContext<'_>,
    params: &Params,
    subset: Option<(u32, u64)>,
    out: &Path,
) -> Result<usize, StageError> {
    let set = params.source.tensors().map_err(|e| StageError::Fatal(e.to_string()))?;
    let indices = subset_indices(set.len(), subset);
    let shape = [&[indices.len()][..], &set.sample_shape[..]].concat();
    let mut images = NpyRowWriter::create(&out.join(IMAGES), &shape)?;
    let preprocess = &params.data.preprocess;
    let scaling = Scaling { preprocess, channel_axis: preprocess.layout.channel_axis(set.sample_shape.len()) };
    let mut written = 0;
    set.read_rows(&indices, &scaling, |row| {
        if written % BLOCK == 0 {
            if context.cancel.load(Ordering::Relaxed) {
                return Err(StageError::Cancelled);
            }
            (context.report)(&format!("{written} of {} samples", indices.len()));
        }
        written += 1;
        Ok(images.append(row)?)
    })?;
    images.finish()?;
    if let Some(labels) = &set.labels {
        let chosen: Vec<i64> = indices.iter().map(|&i| labels[i]).collect();
        tensor_file::write_npy(&out.join(LABELS), &Array1::from(chosen).view().into_dyn())?;
    }
    Ok(indices.len())
}

impl From<TensorError> for StageError {
    fn from(error: TensorError) -> Self {
        StageError::Fatal(error.to_string())
    }
}
