//! Where each role's samples come from: the IDX dataset's splits (the
//! default), an image folder, or a tensor file the spec names. Evaluation,
//! calibration and training each have their own source, so a train folder
//! can feed calibration while a val folder feeds evaluation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::image_folder::{FolderError, ImageFolder};
use super::tensor_source::{Keys, TensorError, TensorSet};
use super::{calibration_indices, DataError, Split};
use crate::spec::{DataSpec, Dataset, SourceSpec};

/// What a role's images are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Evaluation,
    Calibration,
    Training,
}

impl DataSpec {
    /// The source the spec names for `role`, if any.
    pub fn source(&self, role: Role) -> Option<&SourceSpec> {
        match role {
            Role::Evaluation => self.evaluation.as_ref(),
            Role::Calibration => self.calibration.as_ref(),
            Role::Training => self.training.as_ref(),
        }
    }
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
        /// `relative/path label` lines, in place of class subfolders.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        labels_file: Option<PathBuf>,
        #[serde(flatten)]
        subset: OwnSubset,
    },
    Tensors {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label_key: Option<String>,
        /// The model's input name, the default `input_key`.
        model_input: String,
        /// The axes of one sample, which tells a lone sample from a batch.
        sample_rank: usize,
        #[serde(flatten)]
        subset: OwnSubset,
    },
}

/// Whether two paths name one file: equal, or the same once resolved
/// (a symlink, `a/../b`).
fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// A source's own subset, overriding its section's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OwnSubset {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Source {
    /// The source of `role`: the spec's, with paths resolved against
    /// `base`, or the IDX dataset's split. `model_input` is the model's
    /// input name, which tensor files may key their inputs by, and the
    /// axes of one of its samples.
    pub fn of(role: Role, data: &DataSpec, idx_dir: &Path, base: &Path, model_input: (&str, usize)) -> Self {
        let Some(spec) = data.source(role) else {
            return Source::Idx { dataset: data.dataset, dir: idx_dir.to_path_buf(), split: role.idx_split() };
        };
        let subset = OwnSubset { samples: spec.samples, seed: spec.seed };
        match (&spec.images, &spec.tensors) {
            (_, Some(tensors)) => Source::Tensors {
                path: base.join(tensors),
                input_key: spec.input_key.clone(),
                label_key: spec.label_key.clone(),
                model_input: model_input.0.to_string(),
                sample_rank: model_input.1,
                subset,
            },
            (images, None) => Source::ImageFolder {
                // Validation refuses a source with neither.
                root: base.join(images.as_deref().unwrap_or_default()),
                classes: spec.classes.clone(),
                labels_file: spec.labels_file.as_ref().map(|file| base.join(file)),
                subset,
            },
        }
    }

    /// The subset a role takes: the source's own, else the section's
    /// (`None`: every sample).
    pub fn subset(&self, section: Option<(u32, u64)>) -> Option<(u32, u64)> {
        match self {
            Source::ImageFolder { subset: OwnSubset { samples: Some(samples), seed }, .. }
            | Source::Tensors { subset: OwnSubset { samples: Some(samples), seed }, .. } => {
                Some((*samples, seed.or(section.map(|(_, s)| s)).unwrap_or(0)))
            }
            _ => section,
        }
    }

    /// Whether the two may read any of the same images, whichever classes
    /// or subset each takes: the same IDX split, the same folder (unless
    /// each names its own labels file: two lists over one root, ImageNet's
    /// train and val, name their own images), or the same tensors of one
    /// file.
    pub fn shares_images_with(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Idx { dataset: a, split: split_a, .. }, Source::Idx { dataset: b, split: split_b, .. }) => {
                a == b && split_a == split_b
            }
            (
                Source::ImageFolder { root: a, labels_file: labels_a, .. },
                Source::ImageFolder { root: b, labels_file: labels_b, .. },
            ) => {
                same_file(a, b)
                    && match (labels_a, labels_b) {
                        (Some(la), Some(lb)) => same_file(la, lb),
                        _ => true,
                    }
            }
            (
                Source::Tensors { path: a, input_key: key_a, model_input: input_a, .. },
                Source::Tensors { path: b, input_key: key_b, model_input: input_b, .. },
            ) => same_file(a, b) && key_a.as_ref().unwrap_or(input_a) == key_b.as_ref().unwrap_or(input_b),
            _ => false,
        }
    }

    /// Whether the two list the same images in the same order, so that one
    /// role's seeded draw can be held out of the other's by index: they
    /// share images and, for folders, take the same classes from the same
    /// listing. Sources that share images but are not listed alike cannot
    /// be kept apart, and are refused.
    pub fn listed_alike(&self, other: &Source) -> bool {
        let labels_alike = |a: &Option<PathBuf>, b: &Option<PathBuf>| match (a, b) {
            (Some(a), Some(b)) => same_file(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        self.shares_images_with(other)
            && match (self, other) {
                (
                    Source::ImageFolder { classes: classes_a, labels_file: labels_a, .. },
                    Source::ImageFolder { classes: classes_b, labels_file: labels_b, .. },
                ) => classes_a == classes_b && labels_alike(labels_a, labels_b),
                _ => true,
            }
    }

    /// Lists an image folder source.
    pub fn folder(&self) -> Result<ImageFolder, SourceError> {
        match self {
            Source::ImageFolder { root, classes, labels_file: None, .. } => {
                Ok(ImageFolder::open(root, classes.as_deref())?)
            }
            Source::ImageFolder { root, classes, labels_file: Some(file), .. } => {
                Ok(ImageFolder::from_labels_file(root, file, classes.as_deref())?)
            }
            _ => unreachable!("only image folder sources are listed"),
        }
    }

    /// Opens a tensor source.
    pub fn tensors(&self) -> Result<TensorSet, SourceError> {
        match self {
            Source::Tensors { path, input_key, label_key, model_input, sample_rank, .. } => {
                let keys = Keys { input: input_key.as_deref(), labels: label_key.as_deref(), model_input };
                Ok(TensorSet::open(path, &keys, *sample_rank)?)
            }
            _ => unreachable!("only tensor sources are opened"),
        }
    }

    /// The source with its paths made absolute, as the plan records it.
    pub fn absolute(self) -> std::io::Result<Self> {
        Ok(match self {
            Source::ImageFolder { root, classes, labels_file, subset } => Source::ImageFolder {
                root: std::path::absolute(root)?,
                classes,
                labels_file: labels_file.map(std::path::absolute).transpose()?,
                subset,
            },
            Source::Tensors { path, input_key, label_key, model_input, sample_rank, subset } => Source::Tensors {
                path: std::path::absolute(path)?,
                input_key,
                label_key,
                model_input,
                sample_rank,
                subset,
            },
            idx => idx,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tensors(#[from] TensorError),
}

/// The indices of the images a role uses out of `population`, in order:
/// its seeded subset (or all), drawn from what is left once `held_out`,
/// other roles' seeded subsets of the same source, are taken out. The
/// validation subsets hold out the calibration set (and QAT's, the
/// fine-tuning subset) this way.
pub fn subset_indices(population: usize, subset: Option<(u32, u64)>, held_out: &[(u32, u64)]) -> Vec<usize> {
    let excluded: std::collections::HashSet<usize> =
        held_out.iter().flat_map(|&(samples, seed)| calibration_indices(population, samples as usize, seed)).collect();
    let remaining: Vec<usize> = (0..population).filter(|i| !excluded.contains(i)).collect();
    match subset {
        Some((samples, seed)) => {
            calibration_indices(remaining.len(), samples as usize, seed).into_iter().map(|i| remaining[i]).collect()
        }
        None => remaining,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_out_subset_shares_no_index_with_the_one_it_holds_out() {
        let calibration = subset_indices(1000, Some((300, 4)), &[]);
        let validation = subset_indices(1000, Some((500, 9)), &[(300, 4)]);
        assert_eq!(validation.len(), 500);
        assert!(validation.iter().all(|i| !calibration.contains(i)));
        assert_eq!(validation, subset_indices(1000, Some((500, 9)), &[(300, 4)]), "seeded");
        // All that is left, when asked for more.
        assert_eq!(subset_indices(1000, Some((900, 9)), &[(300, 4)]).len(), 700);
        // Several subsets held out at once.
        let training = subset_indices(1000, Some((400, 5)), &[]);
        let both = subset_indices(1000, Some((100, 9)), &[(300, 4), (400, 5)]);
        assert_eq!(both.len(), 100);
        assert!(both.iter().all(|i| !calibration.contains(i) && !training.contains(i)));
    }

    fn folder(root: &Path, classes: Option<&[&str]>, labels: Option<&Path>) -> Source {
        Source::ImageFolder {
            root: root.to_path_buf(),
            classes: classes.map(|c| c.iter().map(|s| s.to_string()).collect()),
            labels_file: labels.map(Path::to_path_buf),
            subset: OwnSubset::default(),
        }
    }

    fn tensors(path: &Path, input_key: Option<&str>, label_key: Option<&str>) -> Source {
        Source::Tensors {
            path: path.to_path_buf(),
            input_key: input_key.map(str::to_string),
            label_key: label_key.map(str::to_string),
            model_input: "input".into(),
            sample_rank: 3,
            subset: OwnSubset { samples: Some(10), seed: None },
        }
    }

    /// Which sources may share images, and which of those can be held out
    /// of each other by index.
    #[test]
    fn sources_share_images_by_their_files_and_are_listed_alike_by_their_listing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir(&root).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        let (train_list, val_list) = (root.join("train.txt"), root.join("val.txt"));
        std::fs::write(&train_list, "").unwrap();
        std::fs::write(&val_list, "").unwrap();

        // One folder reached by a symlink is one folder, listed alike.
        assert!(folder(&root, None, None).listed_alike(&folder(&link, None, None)));
        // Other classes of it share its images but number them otherwise.
        let some = folder(&root, Some(&["bag"]), None);
        assert!(some.shares_images_with(&folder(&root, None, None)));
        assert!(!some.listed_alike(&folder(&root, None, None)));
        // A labels file may list the subfolders' images; two labels files
        // over one root (train and val lists) name their own.
        assert!(folder(&root, None, Some(&train_list)).shares_images_with(&folder(&root, None, None)));
        assert!(!folder(&root, None, Some(&train_list)).shares_images_with(&folder(&root, None, Some(&val_list))));

        // Tensors: the input's key is what names the images; the label key
        // and the subset do not, and the default key is the model input's.
        let file = dir.path().join("data.pt");
        assert!(tensors(&file, None, Some("y")).listed_alike(&tensors(&file, Some("input"), Some("labels"))));
        assert!(!tensors(&file, Some("train_x"), None).shares_images_with(&tensors(&file, Some("val_x"), None)));

        let idx = |split| Source::Idx { dataset: Dataset::FashionMnist, dir: dir.path().to_path_buf(), split };
        assert!(idx(Split::Train).listed_alike(&idx(Split::Train)));
        assert!(!idx(Split::Train).shares_images_with(&idx(Split::Test)));
        assert!(!idx(Split::Train).shares_images_with(&folder(&root, None, None)));
    }
}
