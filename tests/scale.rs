//! Stages stream their data: a split much larger than the headroom a
//! memory limit leaves still runs, and a prepare-data killed at any moment
//! leaves nothing that a later run would trust.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The whole Fashion-MNIST training split (60,000 images: 188 MB as f32)
/// as calibration data, or `samples` of it.
fn calibration_spec(dir: &Path, name: &str, samples: usize) -> std::path::PathBuf {
    let text = quick_spec_json(&format!(
        r#""calibration": {{ "samples": {samples} }}, "matrix": {{ "calibration": ["max"], "residual_fusion": [true] }}"#
    ));
    write(dir, name, &text)
}

/// Starts `qsweep run` with its stderr in `log`; under an address-space
/// limit of `limit_bytes` if given (prlimit execs, so the PID is qsweep's).
/// One malloc arena keeps the address space a process reserves from
/// depending on which threads happened to allocate.
fn start(spec: &Path, results: &Path, log: &Path, limit_bytes: Option<u64>) -> Child {
    let binary = env!("CARGO_BIN_EXE_qsweep");
    let mut command = match limit_bytes {
        Some(limit) => {
            let mut command = Command::new("prlimit");
            command.arg(format!("--as={limit}")).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    command
        .args(["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()])
        .env("MALLOC_ARENA_MAX", "1")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for `child`, sampling its peak virtual size (VmPeak) as it runs;
/// returns the exit code and the last peak seen.
fn wait_measuring(mut child: Child) -> (Option<i32>, u64) {
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return (exit.code(), peak);
        }
        if let Some(kb) = fs::read_to_string(&status)
            .ok()
            .and_then(|text| text.lines().find(|l| l.starts_with("VmPeak:")).map(str::to_string))
            .and_then(|line| line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        {
            peak = peak.max(kb * 1024);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every artifact that `qsweep plan` counts as cached hashes, file for
/// file, to what its manifest records.
fn cached_artifacts_are_whole(spec: &Path, results: &Path) -> usize {
    let output = qsweep(&["plan", spec.to_str().unwrap(), "--json", "--results", results.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let store = qsweep::store::ResultsDir::open(results);
    let mut cached = 0;
    for task in plan["tasks"].as_array().unwrap().iter().filter(|t| t["cached"] == true) {
        let key = task["key"].as_str().unwrap();
        let manifest = store.manifest(&qsweep::plan::TaskKey(key.into())).unwrap();
        for file in &manifest.files {
            let path = results.join("artifacts").join(key).join(&file.name);
            let (bytes, sha256) = qsweep::files::hash_file(&path).unwrap();
            assert!(bytes == file.bytes && sha256 == file.sha256, "{} is trusted but not whole", path.display());
        }
        cached += 1;
    }
    cached
}

/// SIGKILL at points through preparing 60,000 images leaves only whole
/// artifacts trusted; the sweep then resumes and completes under an
/// address-space limit that leaves less headroom (120 MB over what the
/// 500-image sweep reserves) than the split takes as f32 (188 MB), so no
/// stage can hold it whole.
#[test]
fn killed_preparation_is_never_trusted_and_large_splits_stream() {
    let dir = tempfile::tempdir().unwrap();
    let small = calibration_spec(dir.path(), "small.json", 500);
    let (code, small_peak) =
        wait_measuring(start(&small, &dir.path().join("small"), &dir.path().join("small.log"), None));
    assert_eq!(code, Some(0), "{}", fs::read_to_string(dir.path().join("small.log")).unwrap());
    assert!(small_peak > 0, "VmPeak was never read");

    let large = calibration_spec(dir.path(), "large.json", 60_000);
    let results = dir.path().join("results");
    let log = dir.path().join("large.log");
    for delay_ms in [0, 25, 50, 100, 200, 400] {
        let mut child = start(&large, &results, &log, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !fs::read_to_string(&log).unwrap_or_default().contains("start prepare-data") {
            assert!(Instant::now() < deadline, "prepare-data never started");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        cached_artifacts_are_whole(&large, &results);
    }

    let limit = small_peak + (120 << 20);
    let (code, peak) = wait_measuring(start(&large, &results, &log, Some(limit)));
    assert_eq!(code, Some(0), "under a {limit}-byte limit:\n{}", fs::read_to_string(&log).unwrap());
    assert!(peak <= limit, "{peak} over the {limit}-byte limit");
    assert!(csv_rows(&results).iter().all(|r| &r[4] == "ok"));
    assert_eq!(cached_artifacts_are_whole(&large, &results), 7, "every task is complete and whole");
}
