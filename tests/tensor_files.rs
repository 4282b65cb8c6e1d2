//! Tensor files that PyTorch's torch.save and NumPy wrote
//! (tests/fixtures/tensors/make_tensors.py), read back by qsweep's tensor
//! sources: every layout gives the same samples and labels, value for
//! value, and every file that must be refused is refused with a message
//! that names the file and what to do.

use std::path::{Path, PathBuf};

use qsweep::data::tensor_file::read_npy;
use qsweep::data::tensor_source::{Keys, Scaling, TensorError, TensorSet};
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
    let scaling = Scaling { preprocess, channel_axis: 0 };
    set.read_rows(indices, &scaling, |row| {
        all.extend_from_slice(row);
        Ok(())
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
    let preprocess = Preprocess { scale: 255.0, mean: vec![0.5, 0.25, 0.0], std: vec![0.5, 0.25, 2.0], ..Default::default() };
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
    let scaling = Scaling { preprocess: &Preprocess::default(), channel_axis: 0 };
    let error = set.read_rows(&[0, 1, 2, 3, 4, 5], &scaling, |_| Ok(())).unwrap_err().to_string();
    // [4, 1, 2, 3] is element 1*16 + 2*4 + 3 = 27 of sample 4.
    assert!(error.contains("sample 4 holds NaN at element 27"), "{error}");
    // Samples before it are fine on their own.
    set.read_rows(&[0, 1, 2, 3], &scaling, |_| Ok(())).unwrap();
}

#[test]
fn a_folder_without_tensor_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    let message = TensorSet::open(dir.path(), &keys(None, None), 3).unwrap_err().to_string();
    assert!(message.contains("no .pt or .pth files"), "{message}");
}
