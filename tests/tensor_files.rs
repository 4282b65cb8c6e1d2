//! Tensor files that PyTorch's torch.save and NumPy wrote
//! (tests/fixtures/tensors/make_tensors.py), read back by qsweep's tensor
//! sources: every layout gives the same samples and labels, value for
//! value, and every file that must be refused is refused with a message
//! that names the file and what to do.

mod common;

use std::path::{Path, PathBuf};

use qsweep::data::prepared::Normalize;
use qsweep::data::tensor_file::read_npy;
use qsweep::data::tensor_source::{Keys, TensorError, TensorSet};
use qsweep::spec::Preprocess;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensors").join(name)
}

fn keys<'a>(input: Option<&'a str>, labels: Option<&'a str>) -> Keys<'a> {
    Keys { input, labels, model_input: "input" }
}

fn open(name: &str) -> Result<TensorSet, TensorError> {
    TensorSet::open(&fixture(name), &keys(None, None), 3)
}

/// Every sample, in order, as f32, with u8 scaled by `preprocess`.
fn rows(set: &TensorSet, indices: &[usize], preprocess: &Preprocess) -> Vec<f32> {
    let mut all = Vec::new();
    let scaling = Normalize::new(preprocess, 0);
    set.read_rows(indices, &scaling, |row| {
        all.extend_from_slice(row);
        Ok::<(), TensorError>(())
    })
    .unwrap();
    all
}

fn reference() -> (Vec<f32>, Vec<i64>) {
    let images = read_npy::<f32>(&fixture("reference.npy")).unwrap().into_raw_vec_and_offset().0;
    let labels = read_npy::<i64>(&fixture("reference_labels.npy")).unwrap().into_raw_vec_and_offset().0;
    (images, labels)
}

#[test]
fn every_layout_reads_the_same_samples() {
    let (images, labels) = reference();
    let all: Vec<usize> = (0..6).collect();
    for (name, labelled) in [
        ("dict.pt", true),
        ("pairs.pt", true),
        ("list.pt", false),
        ("views.pt", false),
        ("parameter.pt", false),
        ("shards", true),
        ("input.npy", false),
        ("input.npz", true),
        ("compressed.npz", true),
    ] {
        let set = open(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(set.len(), 6, "{name}");
        assert_eq!(set.sample_shape, [3, 4, 4], "{name}");
        assert_eq!(rows(&set, &all, &Preprocess::default()), images, "{name}");
        assert_eq!(set.labels.as_deref(), labelled.then_some(&labels[..]), "{name}");
    }
}

#[test]
fn configured_keys_pick_the_entries() {
    let (images, labels) = reference();
    let set = TensorSet::open(&fixture("renamed.pt"), &keys(Some("x"), Some("y")), 3).unwrap();
    assert_eq!(rows(&set, &[0, 1, 2, 3, 4, 5], &Preprocess::default()), images);
    assert_eq!(set.labels.unwrap(), labels);
}

#[test]
fn half_precision_and_int32_labels_convert_exactly() {
    let (images, labels) = reference();
    let set = open("tuple_f16.pt").unwrap();
    let halves: Vec<f32> = images.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    assert_eq!(rows(&set, &[0, 1, 2, 3, 4, 5], &Preprocess::default()), halves);
    assert_eq!(set.labels.unwrap(), labels);
    let npy = open("input_f16.npy").unwrap();
    assert_eq!(rows(&npy, &[0, 1, 2, 3, 4, 5], &Preprocess::default()), halves);
}

/// u8 inputs get the spec's scale, then mean and std per channel.
#[test]
fn bytes_are_scaled_and_normalized_per_channel() {
    let raw = read_npy::<u8>(&fixture("reference_u8.npy")).unwrap().into_raw_vec_and_offset().0;
    let preprocess =
        Preprocess { scale: 255.0, mean: vec![0.5, 0.25, 0.0], std: vec![0.5, 0.25, 2.0], ..Default::default() };
    let expected: Vec<f32> = raw
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i / 16) % 3;
            (v as f32 / 255.0 - preprocess.mean[c]) / preprocess.std[c]
        })
        .collect();
    for name in ["u8.pt", "input_u8.npy"] {
        let set = open(name).unwrap();
        assert_eq!(rows(&set, &[0, 1, 2, 3, 4, 5], &preprocess), expected, "{name}");
    }
}

/// A subset streams only the rows asked for, across block boundaries.
#[test]
fn subsets_read_only_the_rows_asked_for() {
    let (images, _) = reference();
    let sample = 48;
    let want = [1, 2, 5];
    let expected: Vec<f32> = want.iter().flat_map(|&i| images[i * sample..(i + 1) * sample].to_vec()).collect();
    for name in ["shards", "views.pt", "pairs.pt", "compressed.npz", "input.npy"] {
        let set = open(name).unwrap();
        assert_eq!(rows(&set, &want, &Preprocess::default()), expected, "{name}");
    }
}

fn refusal(name: &str, keys: Keys<'_>) -> String {
    match TensorSet::open(&fixture(name), &keys, 3) {
        Ok(_) => panic!("{name} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn files_that_are_not_plain_tensors_are_refused_with_a_fix() {
    let cases: [(&str, &[&str]); 5] = [
        ("legacy.pt", &["legacy format", "torch.save(torch.load(path), path)"]),
        ("forbidden.pt", &["fractions.Fraction", "weights_only"]),
        ("text.pt", &["key `images` holds a str, not a tensor"]),
        ("transposed.pt", &["non-contiguous", "tensor.contiguous()"]),
        ("bfloat16.pt", &["BFloat16Storage", "float32"]),
    ];
    for (name, expected) in cases {
        let message = refusal(name, keys(None, None));
        assert!(message.contains(name), "{name}: {message}");
        for part in expected {
            assert!(message.contains(part), "{name}: `{part}` not in {message}");
        }
    }
}

#[test]
fn missing_keys_list_what_the_file_holds() {
    let message = refusal("input.npz", keys(Some("pixels"), None));
    assert!(message.contains("no array named `pixels` (it holds: input, labels)"), "{message}");
    assert!(message.contains("input_key"), "{message}");
    let message = refusal("renamed.pt", keys(None, None));
    assert!(message.contains("no key `input` or `images` (its keys: x, y)"), "{message}");
    let message = refusal("dict.pt", keys(None, Some("targets")));
    assert!(message.contains("no key `targets`"), "{message}");
}

#[test]
fn samples_of_the_wrong_rank_are_refused() {
    let message = match TensorSet::open(&fixture("dict.pt"), &keys(None, None), 2) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(message.contains("[3, 4, 4] per sample, but the model takes 2-axis samples"), "{message}");
}

#[test]
fn non_finite_inputs_name_the_sample() {
    let set = open("nan.pt").unwrap();
    let scaling = Normalize::new(&Preprocess::default(), 0);
    let error = set.read_rows(&[0, 1, 2, 3, 4, 5], &scaling, |_| Ok::<(), TensorError>(())).unwrap_err().to_string();
    // [4, 1, 2, 3] is element 1*16 + 2*4 + 3 = 27 of sample 4.
    assert!(error.contains("sample 4 holds NaN at element 27"), "{error}");
    // Samples before it are fine on their own.
    set.read_rows(&[0, 1, 2, 3], &scaling, |_| Ok::<(), TensorError>(())).unwrap();
}

#[test]
fn a_folder_without_tensor_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    let message = TensorSet::open(dir.path(), &keys(None, None), 3).unwrap_err().to_string();
    assert!(message.contains("no .pt or .pth files"), "{message}");
}

mod sweeps {
    //! Tensor sources through `qsweep run` and `qsweep validate`.

    use std::path::Path;

    use super::fixture;
    use crate::common::*;
    use qsweep::data::{self, Split};
    use qsweep::spec::Preprocess;

    fn spec_with_data(dir: &Path, name: &str, data: &str) -> std::path::PathBuf {
        let text = quick_spec_json(r#""matrix": { "calibration": ["max"] }"#).replace(
            r#""data": { "preprocess": { "mean": [0.2860], "std": [0.3530] } }"#,
            &format!(r#""data": {{ "preprocess": {{ "mean": [0.2860], "std": [0.3530] }}, {data} }}"#),
        );
        write(dir, name, &text)
    }

    /// Calibration from the uint8 .pt that torch.save wrote: the prepared
    /// inputs are the IDX images it holds, scaled and normalized as the
    /// spec says, and the sweep runs.
    #[test]
    fn a_sweep_calibrates_from_a_torch_save_file() {
        let dir = tempfile::tempdir().unwrap();
        let pt = fixture("fashion-calibration.pt");
        let spec =
            spec_with_data(dir.path(), "pt.json", &format!(r#""calibration": {{ "tensors": "{}" }}"#, pt.display()));
        let results = dir.path().join("results");
        let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let rows = csv_rows(&results);
        assert!(rows.iter().all(|r| &r[4] == "ok"), "{rows:?}");
        let fp32: f64 = rows[0][5].parse().unwrap();
        let int8: f64 = rows[1][5].parse().unwrap();
        assert!((fp32 - int8).abs() < 2.0, "fp32 {fp32}, int8 calibrated on the .pt {int8}");

        let plan = qsweep(&["plan", spec.to_str().unwrap(), "--json", "--results", results.to_str().unwrap()]);
        let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
        let task = plan["tasks"].as_array().unwrap().iter().find(|t| t["params"]["split"] == "calibration").unwrap();
        // The section's default subset (500) is more than the file holds: all 64.
        let (ours, labels) = prepared_images(&results, task["key"].as_str().unwrap());
        assert_eq!(ours.shape(), [64, 1, 28, 28]);
        let idx =
            data::load_split(Default::default(), Path::new("/usr/share/datasets/fashion-mnist"), Split::Train).unwrap();
        let preprocess = Preprocess { mean: vec![0.2860], std: vec![0.3530], ..Default::default() };
        let theirs = idx.preprocess(&preprocess, Some(&(0..64).collect::<Vec<_>>()));
        let largest = ours.iter().zip(theirs.images.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(largest < 1e-6, "the .pt's images differ from the IDX ones by {largest}");
        assert_eq!(labels, Some(theirs.labels.to_vec()));
    }

    fn validate(spec: &Path) -> String {
        let output = qsweep(&["validate", spec.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        stderr(&output)
    }

    #[test]
    fn tensor_source_mistakes_exit_2_naming_file_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let source = |role: &str, fields: &str| format!(r#""{role}": {{ {fields} }}"#);
        let cases: Vec<(String, Vec<&str>)> = vec![
            (
                source("calibration", &format!(r#""tensors": "{}""#, fixture("dict.pt").display())),
                vec!["dict.pt holds samples of shape [3, 4, 4], but input `input` takes [batch, 1, 28, 28]"],
            ),
            (
                source(
                    "calibration",
                    &format!(r#""tensors": "{}", "input_key": "pixels""#, fixture("input.npz").display()),
                ),
                vec!["no array named `pixels` (it holds: input, labels)"],
            ),
            (
                source("calibration", &format!(r#""tensors": "{}""#, fixture("forbidden.pt").display())),
                vec!["fractions.Fraction"],
            ),
            (
                source("training", &format!(r#""tensors": "{}""#, fixture("u8.pt").display())),
                vec!["holds no labels, which training needs"],
            ),
            (
                source("calibration", &format!(r#""tensors": "{}", "images": "x""#, fixture("u8.pt").display())),
                vec!["names both `images` and `tensors`"],
            ),
            (source("calibration", r#""samples": 5"#), vec!["names neither `images` nor `tensors`"]),
            (
                source("calibration", &format!(r#""tensors": "{}", "classes": ["a"]"#, fixture("u8.pt").display())),
                vec!["`classes` applies to image folders only"],
            ),
        ];
        for (index, (data, expected)) in cases.iter().enumerate() {
            let spec = spec_with_data(dir.path(), &format!("case{index}.json"), data);
            let err = validate(&spec);
            for part in expected {
                assert!(err.contains(part), "case {index}: `{part}` not in {err}");
            }
            assert!(err.contains("fix:") || err.contains("help:") || err.contains("= "), "case {index}: {err}");
        }
    }

    /// A flat folder with a val.txt: labels out of the model's range are
    /// refused before anything runs; in range, the sweep evaluates on it.
    #[test]
    fn a_labels_file_feeds_a_flat_folder() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fashion_images.py");
        let status = std::process::Command::new("/usr/bin/python3").arg(script).arg(&images).arg("3").status().unwrap();
        assert!(status.success());
        // Flatten val/<class>/<n>.png into flat/<n>.png with a labels file.
        let flat = dir.path().join("flat");
        std::fs::create_dir(&flat).unwrap();
        let mut lines = String::new();
        // The model's class order, which fashion_images.py names folders by.
        let classes =
            ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"];
        for (label, class) in classes.iter().enumerate() {
            for file in std::fs::read_dir(images.join("val").join(class)).unwrap() {
                let file = file.unwrap().path();
                let name = file.file_name().unwrap().to_string_lossy().to_string();
                std::fs::copy(&file, flat.join(&name)).unwrap();
                lines.push_str(&format!("{name} {label}\n"));
            }
        }
        let labels = dir.path().join("val.txt");
        std::fs::write(&labels, lines.replacen(" 0\n", " 12\n", 1)).unwrap();
        let data =
            format!(r#""evaluation": {{ "images": "{}", "labels_file": "{}" }}"#, flat.display(), labels.display());
        let spec = spec_with_data(dir.path(), "flat.json", &data);
        let err = validate(&spec);
        assert!(err.contains("val.txt has label 12, but the model scores only 10 classes"), "{err}");

        std::fs::write(&labels, &lines).unwrap();
        let results = dir.path().join("results");
        let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let rows = csv_rows(&results);
        let fp32: f64 = rows[0][5].parse().unwrap();
        assert!(fp32 > 70.0, "fp32 top-1 on 30 labelled PNGs: {fp32}");
    }
}

mod unlabelled {
    //! Evaluation samples without labels: runs are measured against fp32.

    use std::path::Path;

    use crate::common::*;
    use qsweep::data::{self, Split};
    use qsweep::spec::Preprocess;

    fn unlabelled_spec(dir: &Path, baselines: &str) -> std::path::PathBuf {
        let idx =
            data::load_split(Default::default(), Path::new("/usr/share/datasets/fashion-mnist"), Split::Test).unwrap();
        let preprocess = Preprocess { mean: vec![0.2860], std: vec![0.3530], ..Default::default() };
        let images = idx.preprocess(&preprocess, Some(&(0..256).collect::<Vec<_>>())).images;
        let npy = dir.join("eval.npy");
        data::tensor_file::write_npy(&npy, &images.view().into_dyn()).unwrap();
        let text = quick_spec_json(&format!(r#""matrix": {{ "calibration": ["max", "mse"] }}{baselines}"#)).replace(
            r#""data": { "preprocess": { "mean": [0.2860], "std": [0.3530] } }"#,
            r#""data": { "preprocess": { "mean": [0.2860], "std": [0.3530] }, "evaluation": { "tensors": "eval.npy" } }"#,
        );
        write(dir, "unlabelled.json", &text)
    }

    #[test]
    fn runs_report_agreement_and_sqnr_against_fp32() {
        let dir = tempfile::tempdir().unwrap();
        let spec = unlabelled_spec(dir.path(), "");
        let results = dir.path().join("results");
        let output = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let text = std::fs::read_to_string(results.join("runs.csv")).unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let header = reader.headers().unwrap().clone();
        let column = |name: &str| header.iter().position(|h| h == name).unwrap();
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 3);
        for row in &rows {
            assert_eq!(&row[column("status")], "ok");
            assert_eq!(&row[column("accuracy")], "", "no labels, no accuracy");
            let agreement: f64 = row[column("agreement")].parse().unwrap();
            if &row[0] == "fp32" {
                assert_eq!(agreement, 100.0);
                assert_eq!(&row[column("logit_sqnr_db")], "");
            } else {
                assert!((80.0..=100.0).contains(&agreement), "{}: agreement {agreement}", &row[0]);
                let sqnr: f64 = row[column("logit_sqnr_db")].parse().unwrap();
                assert!((5.0..120.0).contains(&sqnr), "{}: SQNR {sqnr} dB", &row[0]);
            }
        }
        let summary = std::fs::read_to_string(results.join("summary.md")).unwrap();
        assert!(summary.contains("have no labels") && summary.contains("agreement"), "{summary}");
    }

    #[test]
    fn without_an_fp32_baseline_they_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = unlabelled_spec(dir.path(), r#", "baselines": []"#);
        let output = qsweep(&["validate", spec.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains("no fp32 baseline"), "{}", stderr(&output));
    }
}
