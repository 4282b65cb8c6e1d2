//! `qsweep init`: a starter spec for a user's own model and data.
//!
//! It reads what can be read (the model's input and output, the data's
//! classes, counts and tensor shapes), guesses what cannot (preprocessing:
//! torchvision's ImageNet pipeline for 224 inputs), validates the result
//! exactly as `qsweep run` would, and writes it only if it passes. The
//! guesses are printed, because a wrong mean or class order gives a
//! plausible sweep with wrong numbers.

use std::path::{Component, Path, PathBuf};

use serde_json::{json, Value};

use crate::data::image_folder::ImageFolder;
use crate::data::tensor_source::{Dtype, Keys, TensorSet};
use crate::onnx::{self, Dim};
use crate::sweep::preview;

/// ImageNet's per-channel statistics, as torchvision's models use them.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What `init` was asked for.
pub struct Request<'a> {
    pub model: &'a Path,
    pub data: &'a Path,
    pub calibration: Option<&'a Path>,
    pub out: &'a Path,
}

/// A written spec and what the user must check in it.
pub struct Starter {
    pub spec: String,
    /// What was read, one line each.
    pub found: Vec<String>,
    /// What was guessed and must be checked.
    pub check: Vec<String>,
}

/// What a data path holds.
enum DataKind {
    Folder(ImageFolder),
    Tensors(TensorSet),
}

/// Builds the starter spec's text (not yet validated or written).
pub fn starter(request: &Request<'_>) -> Result<Starter, String> {
    let model = onnx::Model::load(request.model).map_err(|e| format!("{e}\n  fix: name an fp32 ONNX model"))?;
    let inputs = model.inputs();
    let [input] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(format!(
            "{} has {} inputs ({}); qsweep feeds exactly one image tensor\n  fix: export the model with a single image input",
            request.model.display(),
            inputs.len(),
            names.join(", ")
        ));
    };
    let dims: Vec<Option<u32>> = input
        .shape
        .iter()
        .flatten()
        .map(|dim| match dim {
            Dim::Fixed(n) => u32::try_from(*n).ok(),
            Dim::Dynamic(_) => None,
        })
        .collect();
    let (channels, height, width) = match dims.as_slice() {
        [_, c, h, w] => (*c, *h, *w),
        _ => (None, None, None),
    };
    let classes = model.outputs().first().and_then(|o| o.shape.as_ref()).and_then(|s| match s.last() {
        Some(Dim::Fixed(n)) => Some(*n),
        _ => None,
    });
    let mut found = vec![format!(
        "model {}: input `{}` {}, {}",
        request.model.display(),
        input.name,
        input.shape_text(),
        classes.map_or("an output of unknown width".to_string(), |n| format!("{n} classes"))
    )];
    let mut check = Vec::new();
    let sample_rank = dims.len().saturating_sub(1);
    let open = |path: &Path| -> Result<DataKind, String> {
        if path.is_dir() && has_subfolders(path) {
            ImageFolder::open(path, None).map(DataKind::Folder).map_err(|e| e.to_string())
        } else {
            let keys = Keys { input: None, labels: None, model_input: &input.name };
            TensorSet::open(path, &keys, sample_rank).map(DataKind::Tensors).map_err(|e| e.to_string())
        }
    };
    let spec_dir = request.out.parent().map(Path::to_path_buf).unwrap_or_default();
    let evaluation = open(request.data)?;
    let calibration = request.calibration.map(open).transpose()?;
    let mut any_folder = false;
    let mut any_u8 = false;
    let mut source = |kind: &DataKind, path: &Path, role: &str| -> Value {
        let relative = relative_to(path, &spec_dir);
        match kind {
            DataKind::Folder(folder) => {
                any_folder = true;
                found.push(format!(
                    "{role}: image folder {}: {} classes ({}), {} images",
                    path.display(),
                    folder.classes.len(),
                    preview(&folder.classes),
                    folder.samples.len()
                ));
                json!({ "images": relative })
            }
            DataKind::Tensors(set) => {
                any_u8 |= set.dtypes.contains(&Dtype::U8);
                let dtypes: Vec<&str> = set.dtypes.iter().map(|d| d.name()).collect();
                found.push(format!(
                    "{role}: tensor file {}: {} samples of {:?} ({}), {}",
                    path.display(),
                    set.len(),
                    set.sample_shape,
                    dtypes.join(", "),
                    if set.labels.is_some() { "with labels" } else { "no labels" }
                ));
                json!({ "tensors": relative })
            }
        }
    };
    let mut data = json!({});
    data["evaluation"] = source(&evaluation, request.data, "evaluation");
    if let (Some(kind), Some(path)) = (&calibration, request.calibration) {
        data["calibration"] = source(kind, path, "calibration");
    } else {
        data["calibration"] = data["evaluation"].clone();
        check.push("calibration reads the evaluation data: give --calibration a training-set folder or file, so the test images stay unseen".into());
    }
    let grey = channels == Some(1);
    let (mean, std): (Vec<f32>, Vec<f32>) =
        if grey { (vec![0.5], vec![0.5]) } else { (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec()) };
    let mut preprocess = json!({});
    let folders: Vec<&ImageFolder> = [Some(&evaluation), calibration.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|kind| match kind {
            DataKind::Folder(folder) => Some(folder),
            DataKind::Tensors(_) => None,
        })
        .collect();
    let native = height.zip(width).filter(|&size| folders.iter().all(|folder| all_sized(folder, size)));
    if let Some((h, w)) = native {
        check.push(format!("no resize or crop: the images looked at are {h}x{w} already, the model's input size"));
    }
    if any_folder && native.is_none() {
        match (height, width) {
            (Some(h), Some(w)) if h == w => {
                // torchvision's ImageNet evaluation: resize to crop / 0.875, crop the centre.
                let resize = (h as f32 / 0.875).round() as u32;
                preprocess["resize"] = json!(resize);
                preprocess["center_crop"] = json!(h);
                check.push(format!(
                    "resize {resize} then center_crop {h}: torchvision's ImageNet evaluation; use what the model was trained with"
                ));
            }
            (Some(h), Some(w)) => {
                preprocess["resize"] = json!([h, w]);
                check.push(format!("resize to exactly [{h}, {w}], the model's input size"));
            }
            _ => {
                preprocess["resize"] = json!(256);
                preprocess["center_crop"] = json!(224);
                check.push("the model takes any size: resize 256 then center_crop 224 (torchvision's ImageNet evaluation) was picked".into());
            }
        }
    }
    if any_folder {
        preprocess["color"] = json!(if grey { "grey" } else { "rgb" });
        if !grey {
            check.push("color rgb: use bgr if the model was trained on OpenCV-decoded images".into());
        }
    }
    if any_folder || any_u8 {
        preprocess["mean"] = json!(mean);
        preprocess["std"] = json!(std);
        check.push(format!(
            "mean {mean:?} and std {std:?} ({}): use the model's own training statistics",
            if grey { "a guess for grey images" } else { "ImageNet's" }
        ));
    }
    if !preprocess.as_object().is_some_and(|p| p.is_empty()) {
        data["preprocess"] = preprocess;
    }
    if let DataKind::Folder(folder) = &evaluation {
        if classes.is_some_and(|n| n as usize == folder.classes.len()) {
            check.push("class order: the evaluation folder's subfolders, sorted by name, are classes 0, 1, ...; give data.evaluation.classes if the model orders them otherwise".into());
        }
    }
    if matches!(evaluation, DataKind::Tensors(_)) {
        check.push("float tensors are fed as they are: they must already be preprocessed as the model expects".into());
    }
    let model_relative = relative_to(request.model, &spec_dir);
    let spec = json!({
        "name": sweep_name(request.model),
        "model": model_relative,
        "data": data,
        "matrix": { "calibration": ["max", "mse", "entropy", "percentile"], "residual_fusion": [false, true] },
        "evaluate": { "batch_sizes": [1, 32] },
    });
    let text = serde_json::to_string_pretty(&spec).expect("a spec serializes") + "\n";
    Ok(Starter { spec: text, found, check })
}

/// Whether the folder's first images (a sample: reading every header of a
/// large folder would take long) are `size` already.
fn all_sized(folder: &ImageFolder, (height, width): (u32, u32)) -> bool {
    folder.samples.iter().take(16).all(|sample| image::image_dimensions(&sample.path).ok() == Some((width, height)))
}

/// Whether `dir` holds a visible subfolder (an ImageFolder), rather than
/// `.pt` files.
fn has_subfolders(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| entry.path().is_dir() && !entry.file_name().to_string_lossy().starts_with('.'))
}

/// A sweep name from the model's file name, in the spec's alphabet.
fn sweep_name(model: &Path) -> String {
    let stem = model.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let name: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).collect();
    let name = name.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    if name.is_empty() {
        "sweep".to_string()
    } else {
        name.chars().take(100).collect()
    }
}

/// `path` as the spec should name it: relative to the spec's folder when
/// both are on the same tree, else absolute.
fn relative_to(path: &Path, base: &Path) -> String {
    let (Ok(path), Ok(base)) = (std::path::absolute(path), std::path::absolute(base)) else {
        return path.display().to_string();
    };
    let path: Vec<Component> = path.components().collect();
    let base: Vec<Component> = base.components().collect();
    let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    if common <= 1 {
        return path.iter().collect::<PathBuf>().display().to_string();
    }
    let mut relative: PathBuf = base[common..].iter().map(|_| Component::ParentDir).collect();
    relative.extend(&path[common..]);
    relative.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_to_the_spec_folder() {
        assert_eq!(relative_to(Path::new("/a/b/model.onnx"), Path::new("/a/c")), "../b/model.onnx");
        assert_eq!(relative_to(Path::new("/a/b/val"), Path::new("/a/b")), "val");
        assert_eq!(relative_to(Path::new("/x/val"), Path::new("/a")), "/x/val");
    }

    #[test]
    fn names_follow_the_spec_alphabet() {
        assert_eq!(sweep_name(Path::new("dir/ResNet 50 (v1.5).onnx")), "ResNet-50--v1.5-");
        assert_eq!(sweep_name(Path::new("_x.onnx")), "x");
        assert_eq!(sweep_name(Path::new("__.onnx")), "sweep");
    }
}
