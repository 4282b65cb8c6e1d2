//! Image decoding and preprocessing against Debian's python3-pil on real
//! files PIL wrote: grey and RGB JPEGs (4:4:4 and 4:2:0), palette, RGBA and
//! grey+alpha PNGs, BMP, lossless WebP, odd sizes and an image smaller
//! than the crop, through six torchvision-style pipelines each
//! (tests/fixtures/images/pil_reference.py). Every pixel must be within
//! ±1 of PIL's.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use qsweep::data::image;
use qsweep::spec::Preprocess;

#[test]
fn pixels_match_pil_within_one() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/pil_reference.py");
    let output = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("Debian's python3 with python3-pil (scripts/setup --with-test-services)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut worst = Vec::new();
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let preprocess: Preprocess = serde_json::from_value(case["preprocess"].clone()).unwrap();
        let color = preprocess.color.unwrap();
        let ours = image::prepare(&dir.path().join(file), &preprocess, color).unwrap();
        let theirs = base64::engine::general_purpose::STANDARD.decode(case["pixels"].as_str().unwrap()).unwrap();
        let label = format!("{file} {}", case["preprocess"]);
        assert_eq!(
            (ours.width, ours.height, ours.channels),
            (
                case["width"].as_u64().unwrap() as u32,
                case["height"].as_u64().unwrap() as u32,
                case["channels"].as_u64().unwrap() as usize
            ),
            "{label}"
        );
        let differences: Vec<i32> = ours.data.iter().zip(&theirs).map(|(&a, &b)| (a as i32 - b as i32).abs()).collect();
        let largest = differences.iter().copied().max().unwrap_or(0);
        let off = differences.iter().filter(|&&d| d > 0).count();
        worst.push((largest, off, differences.len(), label));
    }
    worst.sort();
    let (off, of) = worst.iter().fold((0, 0), |(o, t), (_, off, of, _)| (o + off, t + of));
    eprintln!(
        "{} cases against PIL {}: largest difference {}, {off} of {of} values off by one ({:.2}%)",
        worst.len(),
        expected["pil"],
        worst.last().map_or(0, |w| w.0),
        100.0 * off as f64 / of as f64
    );
    let failing: Vec<_> = worst.iter().filter(|(largest, ..)| *largest > 1).collect();
    assert!(failing.is_empty(), "beyond ±1 of PIL {}: {failing:#?}", expected["pil"]);
}
