//! prepare-data: turns the dataset into the tensors later stages read.
//!
//! Up to three tasks of this stage exist per sweep: the whole test split
//! for evaluation, the seeded calibration subset of the training split,
//! and, for QAT, the seeded subset of the training split it fine-tunes on.
//! Both are written as .npy; the calibration set is also written as a
//! PyTorch .pt dict (`images`, `labels`), the form NVIDIA's PTQ flow
//! prepares, so a PyTorch user can calibrate on exactly the same images.

use std::path::Path;

use ndarray::Array1;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{params, StageContext, StageError};
use crate::data::tensor_file::{self, PtTensor};
use crate::data::{self, Split};
use crate::plan::Task;
use crate::spec::{Dataset, Preprocess};

pub const VERSION: u32 = 1;

pub const IMAGES: &str = "images.npy";
pub const LABELS: &str = "labels.npy";
pub const CALIBRATION_PT: &str = "calibration.pt";

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", tag = "split")]
enum Params {
    Test { data: DataParams },
    Calibration { data: DataParams, samples: usize, seed: u64 },
    Train { data: DataParams, samples: usize, seed: u64 },
}

#[derive(Deserialize)]
struct DataParams {
    dataset: Dataset,
    preprocess: Preprocess,
}

pub fn run(task: &Task, context: &StageContext<'_>, out: &Path) -> Result<Value, StageError> {
    let data_dir = &context.sweep.data_dir;
    let load =
        |dataset, split| data::load_split(dataset, data_dir, split).map_err(|e| StageError::Fatal(e.to_string()));
    match params::<Params>(task)? {
        Params::Test { data } => {
            let raw = load(data.dataset, Split::Test)?;
            let tensors = raw.preprocess(&data.preprocess, None);
            tensor_file::write_npy(&out.join(IMAGES), &tensors.images.view().into_dyn())?;
            tensor_file::write_npy(&out.join(LABELS), &tensors.labels.view().into_dyn())?;
            Ok(json!({"split": "test", "count": raw.count}))
        }
        Params::Calibration { data, samples, seed } => {
            let raw = load(data.dataset, Split::Train)?;
            let indices = data::calibration_indices(raw.count, samples, seed);
            let tensors = raw.preprocess(&data.preprocess, Some(&indices));
            tensor_file::write_npy(&out.join(IMAGES), &tensors.images.view().into_dyn())?;
            tensor_file::write_npy(&out.join(LABELS), &tensors.labels.view().into_dyn())?;
            let labels: Array1<i64> = tensors.labels.mapv(i64::from);
            tensor_file::write_pt(
                &out.join(CALIBRATION_PT),
                &[
                    ("images", PtTensor::F32(tensors.images.view().into_dyn())),
                    ("labels", PtTensor::I64(labels.view().into_dyn())),
                ],
            )?;
            Ok(json!({"split": "calibration", "count": indices.len(), "seed": seed}))
        }
        Params::Train { data, samples, seed } => {
            let raw = load(data.dataset, Split::Train)?;
            let indices = data::calibration_indices(raw.count, samples, seed);
            let tensors = raw.preprocess(&data.preprocess, Some(&indices));
            tensor_file::write_npy(&out.join(IMAGES), &tensors.images.view().into_dyn())?;
            tensor_file::write_npy(&out.join(LABELS), &tensors.labels.view().into_dyn())?;
            Ok(json!({"split": "train", "count": indices.len(), "seed": seed}))
        }
    }
}
