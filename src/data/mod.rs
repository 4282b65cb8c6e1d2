//! Datasets: reading them, preprocessing pixels into model inputs, and
//! drawing the seeded calibration subset.

pub mod idx;
pub mod image;
pub mod image_folder;
pub mod prepared;
pub mod pt_file;
pub mod source;
pub mod tensor_file;
pub mod tensor_source;

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array4};
use rand::SeedableRng;
use thiserror::Error;

use crate::spec::{Dataset, Preprocess};

#[derive(Debug, Error)]
pub enum DataError {
    #[error("the {dataset} dataset is missing: {missing} is not in {dir}")]
    Missing { dataset: &'static str, dir: PathBuf, missing: String },
    #[error(transparent)]
    Idx(#[from] idx::IdxError),
    #[error("{path} holds {found}, expected {expected}")]
    Shape { path: PathBuf, found: String, expected: String },
    #[error("{images} has {image_count} images but {labels} has {label_count} labels")]
    CountMismatch { images: PathBuf, image_count: usize, labels: PathBuf, label_count: usize },
}

impl DataError {
    /// What the user should do about it.
    pub fn fix(&self, dataset: Dataset) -> String {
        match self {
            DataError::Missing { .. } => format!(
                "install Debian's package (`apt-get install dataset-{}`) or point data.dir at a directory with the IDX files",
                dataset.name()
            ),
            _ => "replace the damaged files, e.g. `apt-get install --reinstall` the dataset package".to_string(),
        }
    }
}

/// An IDX split, as plan parameters name it (`train`, `test`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Raw images of one split, N x H x W bytes, with their labels.
pub struct RawImages {
    pub count: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

/// The IDX files of one split, gzipped or not, whichever exists.
pub fn split_files(dataset: Dataset, dir: &Path, split: Split) -> Result<(PathBuf, PathBuf), DataError> {
    let find = |stem: String| -> Result<PathBuf, DataError> {
        [format!("{stem}.gz"), stem.clone()]
            .into_iter()
            .map(|name| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| DataError::Missing {
                dataset: dataset.name(),
                dir: dir.to_path_buf(),
                missing: format!("{stem}[.gz]"),
            })
    };
    Ok((find(format!("{}-images-idx3-ubyte", split.prefix()))?, find(format!("{}-labels-idx1-ubyte", split.prefix()))?))
}

/// Reads one split and checks that images and labels agree.
pub fn load_split(dataset: Dataset, dir: &Path, split: Split) -> Result<RawImages, DataError> {
    let (images_path, labels_path) = split_files(dataset, dir, split)?;
    let images = idx::read(&images_path)?;
    let labels = idx::read(&labels_path)?;
    let [count, height, width] = images.dims[..] else {
        return Err(DataError::Shape {
            path: images_path,
            found: format!("{} dimensions", images.dims.len()),
            expected: "3 (count, height, width)".into(),
        });
    };
    if labels.dims.len() != 1 {
        return Err(DataError::Shape {
            path: labels_path,
            found: format!("{} dimensions", labels.dims.len()),
            expected: "1 (count)".into(),
        });
    }
    if labels.dims[0] != count {
        return Err(DataError::CountMismatch {
            images: images_path,
            image_count: count,
            labels: labels_path,
            label_count: labels.dims[0],
        });
    }
    Ok(RawImages { count, height, width, pixels: images.data, labels: labels.data })
}

/// The (height, width) of a split's images, from the IDX headers alone.
pub fn split_image_size(dataset: Dataset, dir: &Path, split: Split) -> Result<(usize, usize), DataError> {
    let (images_path, _) = split_files(dataset, dir, split)?;
    match idx::dims(&images_path)?[..] {
        [_, height, width] => Ok((height, width)),
        ref other => Err(DataError::Shape {
            path: images_path,
            found: format!("{} dimensions", other.len()),
            expected: "3 (count, height, width)".into(),
        }),
    }
}

/// How many images a split holds, from the IDX header alone.
pub fn split_count(dataset: Dataset, dir: &Path, split: Split) -> Result<usize, DataError> {
    let (images_path, _) = split_files(dataset, dir, split)?;
    Ok(idx::dims(&images_path)?.first().copied().unwrap_or(0))
}

/// A batch of model inputs, NCHW f32, with their labels.
pub struct Tensors {
    pub images: Array4<f32>,
    pub labels: Array1<i64>,
}

impl RawImages {
    /// Preprocesses the images at `indices` (all of them when `None`) into a
    /// single-channel NCHW tensor.
    pub fn preprocess(&self, preprocess: &Preprocess, indices: Option<&[usize]>) -> Tensors {
        let all: Vec<usize>;
        let indices = match indices {
            Some(indices) => indices,
            None => {
                all = (0..self.count).collect();
                &all
            }
        };
        let plane = self.height * self.width;
        let (mean, std) = (preprocess.mean[0], preprocess.std[0]);
        let mut images = Array4::<f32>::zeros((indices.len(), 1, self.height, self.width));
        let out = images.as_slice_mut().expect("a fresh array is contiguous");
        for (row, &index) in indices.iter().enumerate() {
            let source = &self.pixels[index * plane..(index + 1) * plane];
            for (target, &pixel) in out[row * plane..(row + 1) * plane].iter_mut().zip(source) {
                *target = (pixel as f32 / preprocess.scale - mean) / std;
            }
        }
        let labels = Array1::from_iter(indices.iter().map(|&i| i64::from(self.labels[i])));
        Tensors { images, labels }
    }
}

/// `samples` distinct indices below `population`, the same for the same seed
/// on every machine (ChaCha8 is value-stable across platforms and releases).
pub fn calibration_indices(population: usize, samples: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut indices = rand::seq::index::sample(&mut rng, population, samples.min(population)).into_vec();
    // Sorted so the subset reads as a set, not as an order.
    indices.sort_unstable();
    indices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_draw_is_seeded_and_distinct() {
        let a = calibration_indices(60_000, 500, 7);
        assert_eq!(a, calibration_indices(60_000, 500, 7));
        assert_ne!(a, calibration_indices(60_000, 500, 8));
        let mut unique = a.clone();
        unique.dedup();
        assert_eq!(unique.len(), 500);
        assert!(a.iter().all(|&i| i < 60_000));
    }

    #[test]
    fn preprocessing_scales_then_normalises() {
        let raw = RawImages { count: 2, height: 1, width: 2, pixels: vec![0, 255, 51, 102], labels: vec![3, 4] };
        let pre = Preprocess { scale: 255.0, mean: vec![0.2], std: vec![0.5], ..Default::default() };
        let t = raw.preprocess(&pre, Some(&[1]));
        let values: Vec<f32> = t.images.iter().copied().collect();
        assert!((values[0] - (0.2 - 0.2) / 0.5).abs() < 1e-6);
        assert!((values[1] - (0.4 - 0.2) / 0.5).abs() < 1e-6);
        assert_eq!(t.labels.to_vec(), [4]);
    }
}
