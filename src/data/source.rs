//! Where each role's images come from: the IDX dataset's splits (the
//! default), or an image folder the spec names. Evaluation, calibration
//! and training each have their own source, so a train folder can feed
//! calibration while a val folder feeds evaluation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::image_folder::{FolderError, ImageFolder};
use super::{calibration_indices, DataError, Split};
use crate::spec::{DataSpec, Dataset, SourceSpec};

/// What a role's images are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Evaluation,
    Calibration,
    Training,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Evaluation, Role::Calibration, Role::Training];

    /// The spec field that names the role's source.
    pub fn field(self) -> &'static str {
        match self {
            Role::Evaluation => "evaluation",
            Role::Calibration => "calibration",
            Role::Training => "training",
        }
    }

    /// The IDX split a role reads when the spec names no source.
    fn idx_split(self) -> Split {
        match self {
            Role::Evaluation => Split::Test,
            Role::Calibration | Role::Training => Split::Train,
        }
    }
}

/// A role's source, resolved: paths absolute, as the plan records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Source {
    Idx {
        dataset: Dataset,
        #[serde(skip)]
        dir: PathBuf,
        split: Split,
    },
    ImageFolder {
        root: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        classes: Option<Vec<String>>,
        /// The source's own subset, overriding the section's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        samples: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
    },
}

impl Source {
    /// The source of `role`: the spec's, with paths resolved against
    /// `base`, or the IDX dataset's split.
    pub fn of(role: Role, data: &DataSpec, idx_dir: &Path, base: &Path) -> Self {
        let named = match role {
            Role::Evaluation => &data.evaluation,
            Role::Calibration => &data.calibration,
            Role::Training => &data.training,
        };
        match named {
            Some(SourceSpec { images, classes, samples, seed }) => Source::ImageFolder {
                root: base.join(images),
                classes: classes.clone(),
                samples: *samples,
                seed: *seed,
            },
            None => Source::Idx { dataset: data.dataset, dir: idx_dir.to_path_buf(), split: role.idx_split() },
        }
    }

    pub fn is_image_folder(&self) -> bool {
        matches!(self, Source::ImageFolder { .. })
    }

    /// The subset a role takes: the source's own, else the section's
    /// (`None`: every image).
    pub fn subset(&self, section: Option<(u32, u64)>) -> Option<(u32, u64)> {
        match self {
            Source::ImageFolder { samples: Some(samples), seed, .. } => {
                Some((*samples, seed.or(section.map(|(_, s)| s)).unwrap_or(0)))
            }
            _ => section,
        }
    }

    /// Lists an image folder source.
    pub fn folder(&self) -> Result<ImageFolder, SourceError> {
        match self {
            Source::ImageFolder { root, classes, .. } => Ok(ImageFolder::open(root, classes.as_deref())?),
            Source::Idx { .. } => unreachable!("only image folder sources are listed"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error(transparent)]
    Data(#[from] DataError),
}

/// The indices of the images a role uses out of `population`, in order.
pub fn subset_indices(population: usize, subset: Option<(u32, u64)>) -> Vec<usize> {
    match subset {
        Some((samples, seed)) => calibration_indices(population, samples as usize, seed),
        None => (0..population).collect(),
    }
}
