//! `qsweep init` on models and data it has never seen: it reads the
//! model's contract and the data, writes a spec that validates, says what
//! it guessed, and writes nothing when it cannot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use prost::Message;

fn fashion_folders(dir: &Path) -> PathBuf {
    let out = dir.join("images");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fashion_images.py");
    let status = Command::new("/usr/bin/python3").arg(script).arg(&out).arg("3").status().expect("python3-pil");
    assert!(status.success());
    out
}

fn calibration_pt() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensors/fashion-calibration.pt")
}

#[test]
fn a_starter_spec_for_the_reference_model_validates_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_folders(dir.path());
    let out = dir.path().join("starter.json");
    let model = reference_model();
    let output = qsweep(&[
        "init",
        "--model",
        model.to_str().unwrap(),
        "--data",
        images.join("val").to_str().unwrap(),
        "--calibration",
        calibration_pt().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let said = stdout(&output);
    assert!(said.contains("input `input` [batch, 1, 28, 28], 10 classes"), "{said}");
    assert!(said.contains("10 classes") && said.contains("30 images"), "{said}");
    assert!(said.contains("64 samples of [1, 28, 28] (uint8), with labels"), "{said}");
    assert!(said.contains("no resize or crop") && said.contains("mean"), "{said}");
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(spec["data"]["evaluation"]["images"], "images/val", "paths relative to the spec");
    assert_eq!(spec["data"]["preprocess"]["color"], "grey");
    let validate = qsweep(&["validate", out.to_str().unwrap()]);
    assert_eq!(validate.status.code(), Some(0), "{}", stderr(&validate));
    assert!(stdout(&validate).contains("9 run(s)"), "{}", stdout(&validate));

    // An existing spec is kept unless --force.
    let before = std::fs::read(&out).unwrap();
    let again = qsweep(&[
        "init",
        "--model",
        model.to_str().unwrap(),
        "--data",
        images.join("val").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

/// A 3-channel 224x224 model gets torchvision's ImageNet preprocessing
/// for smaller images.
#[test]
fn a_224_colour_model_gets_imagenet_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_folders(dir.path());
    let architecture = qsweep::train::resnet::Architecture {
        depth: 8,
        width: 4,
        channels: 3,
        height: 224,
        width_px: 224,
        classes: 10,
    };
    let model = dir.path().join("rgb224.onnx");
    std::fs::write(&model, qsweep::train::resnet::resnet(architecture, 0).unwrap().encode_to_vec()).unwrap();
    let out = dir.path().join("rgb.json");
    let output = qsweep(&[
        "init",
        "--model",
        model.to_str().unwrap(),
        "--data",
        images.join("val").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let said = stdout(&output);
    assert!(said.contains("resize 256 then center_crop 224"), "{said}");
    assert!(said.contains("calibration reads the evaluation data"), "{said}");
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let preprocess = &spec["data"]["preprocess"];
    assert_eq!(preprocess["resize"], 256);
    assert_eq!(preprocess["center_crop"], 224);
    assert_eq!(preprocess["color"], "rgb");
    assert_eq!(preprocess["mean"].as_array().unwrap().len(), 3);

    // Without `color`, the grey PNGs are converted for the colour model, and validation says so.
    let mut spec = spec;
    spec["data"]["preprocess"].as_object_mut().unwrap().remove("color");
    let unset = write(dir.path(), "unset.json", &spec.to_string());
    let validate = qsweep(&["validate", unset.to_str().unwrap()]);
    assert_eq!(validate.status.code(), Some(0), "{}", stderr(&validate));
    let note = stderr(&validate);
    assert!(note.contains("evaluation images are grey") && note.contains("convert(\"RGB\")"), "{note}");
}

/// Data that does not fit the model: exit 2 with the validation's reasons,
/// and no file.
#[test]
fn data_that_does_not_fit_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.json");
    let wrong = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensors/dict.pt");
    let output = qsweep(&[
        "init",
        "--model",
        reference_model().to_str().unwrap(),
        "--data",
        wrong.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("holds samples of shape [3, 4, 4], but input `input` takes [batch, 1, 28, 28]"), "{err}");
    assert!(err.contains("nothing was written"), "{err}");
    assert!(!out.exists());
}
