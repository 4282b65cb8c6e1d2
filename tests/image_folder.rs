//! A sweep on image folders that PIL wrote (scripts/fashion_images.py):
//! evaluation on PNGs, calibration on JPEGs, through `qsweep run`; and the
//! folder errors a user meets, each exit 2 naming what is wrong.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use qsweep::data::{self, Split};
use qsweep::spec::Preprocess;

const CLASSES: &str =
    r#"["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]"#;

/// val/ (PNG) and train/ (JPEG), 20 images of each class.
fn write_folders(dir: &Path) -> PathBuf {
    let out = dir.join("images");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fashion_images.py");
    let status = Command::new("/usr/bin/python3").arg(script).arg(&out).arg("20").status().expect("python3-pil");
    assert!(status.success());
    out
}

fn folder_spec(dir: &Path, images: &Path, data_extra: &str) -> PathBuf {
    let text = quick_spec_json(r#""matrix": { "calibration": ["max"], "residual_fusion": [true] }"#).replace(
        r#""data": { "preprocess": { "mean": [0.2860], "std": [0.3530] } }"#,
        &format!(
            r#""data": {{
    "preprocess": {{ "mean": [0.2860], "std": [0.3530] }},
    "evaluation": {{ "images": "{}", "classes": {CLASSES} }},
    "calibration": {{ "images": "{}", "classes": {CLASSES} }}{data_extra}
  }}"#,
            images.join("val").display(),
            images.join("train").display()
        ),
    );
    write(dir, "folder.json", &text)
}

/// The folder sweep runs end to end, and the evaluation images are the
/// IDX test images they were written from, value for value, with their
/// labels, in ImageFolder's order.
#[test]
fn a_sweep_runs_on_image_folders() {
    let dir = tempfile::tempdir().unwrap();
    let images = write_folders(dir.path());
    let spec = folder_spec(dir.path(), &images, "");
    let results = dir.path().join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = csv_rows(&results);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| &r[4] == "ok"), "{rows:?}");
    let fp32: f64 = rows[0][5].parse().unwrap();
    assert!(fp32 > 80.0, "fp32 top-1 on the folder: {fp32}");

    let plan = qsweep(&["plan", spec.to_str().unwrap(), "--json", "--results", results.to_str().unwrap()]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let test = plan["tasks"].as_array().unwrap().iter().find(|t| t["params"]["split"] == "test").unwrap();
    let (ours, labels) = prepared_images(&results, test["key"].as_str().unwrap());
    let labels = labels.expect("a labelled folder");
    assert_eq!(ours.shape(), [200, 1, 28, 28]);

    let idx =
        data::load_split(Default::default(), Path::new("/usr/share/datasets/fashion-mnist"), Split::Test).unwrap();
    let preprocess = Preprocess { mean: vec![0.2860], std: vec![0.3530], ..Default::default() };
    // ImageFolder order: classes sorted by folder name, files by name.
    let mut files: Vec<PathBuf> = fs::read_dir(images.join("val"))
        .unwrap()
        .flat_map(|class| fs::read_dir(class.unwrap().path()).unwrap().map(|f| f.unwrap().path()))
        .collect();
    files.sort();
    let indices: Vec<usize> = files.iter().map(|f| f.file_stem().unwrap().to_str().unwrap().parse().unwrap()).collect();
    let theirs = idx.preprocess(&preprocess, Some(&indices));
    assert_eq!(labels, theirs.labels.to_vec(), "labels follow the classes list");
    let largest = ours.iter().zip(theirs.images.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(largest < 1e-6, "PNG pixels differ from the IDX ones by {largest}");
}

/// Each folder mistake is exit 2 with the path and what to do.
#[test]
fn folder_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let images = write_folders(dir.path());
    let validate = |spec: &Path| {
        let output = qsweep(&["validate", spec.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        stderr(&output)
    };

    // A classes list that leaves a folder out.
    let spec = folder_spec(dir.path(), &images, "");
    let text = fs::read_to_string(&spec).unwrap().replacen(r#", "ankle-boot"]"#, "]", 1);
    let err = validate(&write(dir.path(), "unlisted.json", &text));
    assert!(err.contains("`ankle-boot`, which the `classes` list does not name"), "{err}");

    // Fewer classes than the model scores, and no list.
    let text = fs::read_to_string(&spec).unwrap().replacen(&format!(r#", "classes": {CLASSES}"#), "", 1);
    fs::remove_dir_all(images.join("val/bag")).unwrap();
    let err = validate(&write(dir.path(), "nine.json", &text));
    assert!(err.contains("the model scores 10 classes, but") && err.contains("has 9 class(es)"), "{err}");
    assert!(err.contains("data.evaluation.classes"), "{err}");

    // An empty class folder.
    fs::create_dir(images.join("val/bag")).unwrap();
    let err = validate(&spec);
    assert!(err.contains("val/bag holds no images"), "{err}");
    fs::remove_dir(images.join("val/bag")).unwrap();

    // Colour images for a grey model.
    let text =
        fs::read_to_string(&spec).unwrap().replace(r#""std": [0.3530] }"#, r#""std": [0.3530], "color": "rgb" }"#);
    let err = validate(&write(dir.path(), "rgb.json", &text));
    assert!(err.contains("gives 3 channel(s), but input") && err.contains("takes 1"), "{err}");

    // A folder that is not there.
    let text = fs::read_to_string(&spec).unwrap().replace("/val", "/nowhere");
    let err = validate(&write(dir.path(), "missing.json", &text));
    assert!(err.contains("cannot read the image folder") && err.contains("nowhere"), "{err}");
}

/// A corrupt image fails its stage naming the file; nothing half-written
/// is left, and the run says failed.
#[test]
fn a_corrupt_image_fails_the_stage_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let images = write_folders(dir.path());
    let victim = fs::read_dir(images.join("val/coat")).unwrap().next().unwrap().unwrap().path();
    fs::write(&victim, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let spec = folder_spec(dir.path(), &images, "");
    let results = dir.path().join("results");
    let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let rows = csv_rows(&results);
    let error = &rows[0][rows[0].len() - 1];
    assert!(error.contains(&victim.display().to_string()), "{error}");
    assert_eq!(staging_dirs(&results), Vec::<String>::new());
}
