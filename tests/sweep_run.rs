//! End-to-end sweeps through the real binary: real Fashion-MNIST, real
//! ONNX Runtime, real files.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn run_into(spec: &Path, results: &Path) -> std::process::Output {
    qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()])
}

/// The reference sweep's PTQ half: the committed spec without its QAT
/// runs, which take minutes (tests/train.rs and the committed reference
/// results cover QAT), and without its `float_layers` runs and
/// sensitivity section (tests/fallback.rs covers those).
fn ptq_reference_spec(dir: &Path) -> std::path::PathBuf {
    let text = fs::read_to_string(reference_spec()).unwrap();
    let sensitivity = text.lines().find(|l| l.trim_start().starts_with(r#""sensitivity""#)).unwrap().to_string();
    for part in [r#""qat_epochs": [0, 2]"#, r#""float_layers": [0, "auto"]"#] {
        assert!(text.contains(part), "the reference spec no longer has {part}");
    }
    let model = reference_spec().parent().unwrap().join("models/fashion-resnet8.onnx");
    let text = text
        .replace(r#""qat_epochs": [0, 2]"#, r#""qat_epochs": [0]"#)
        .replace(r#""float_layers": [0, "auto"]"#, r#""float_layers": [0]"#)
        .replace(&format!("{sensitivity}\n"), "")
        .replace(r#""models/fashion-resnet8.onnx""#, &format!("{:?}", model.to_str().unwrap()));
    write(dir, "fashion-resnet.json", &text)
}

/// The reference sweep measures the committed model for real (fp32 and
/// the eight PTQ recipes), writes every report, and a rerun skips everything.
#[test]
fn reference_sweep_measures_reports_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let spec = ptq_reference_spec(dir.path());
    let first = qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap(), "--jobs", "2"]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(stderr(&first).contains("21 task(s) executed, 0 reused"), "{}", stderr(&first));
    // Off a terminal, the run counts are printed when they change, not
    // after every event (this sweep takes well under a minute).
    let log = stderr(&first);
    let counts: Vec<&str> = log.lines().filter(|l| l.starts_with("runs: ")).collect();
    assert!(counts.windows(2).all(|pair| pair[0] != pair[1]), "repeated run counts: {counts:?}");
    assert!(counts.last().is_some_and(|last| last.starts_with("runs: 9 done")), "{counts:?}");

    let csv_text = fs::read_to_string(results.join("runs.csv")).unwrap();
    assert!(csv_text.starts_with(
        "run,calibration,residual_fusion,qat_epochs,status,accuracy,accuracy_delta,top5,agreement,logit_sqnr_db,latency_p50_ms,latency_p99_ms,throughput,"
    ));
    let rows = csv_rows(&results);
    let header = csv::Reader::from_path(results.join("runs.csv")).unwrap().headers().unwrap().clone();
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert_eq!(rows.len(), 9);
    assert!(rows.iter().all(|r| &r[4] == "ok"), "{csv_text}");
    let fp32 = &rows[0];
    assert_eq!((&fp32[0], &fp32[1], &fp32[4]), ("fp32", "", "ok"));
    let accuracy: f64 = fp32[5].parse().unwrap();
    assert!(accuracy >= 91.0, "reference model top-1 {accuracy}% is below the 91% floor");
    let (p50, p99): (f64, f64) =
        (fp32[column("latency_p50_ms")].parse().unwrap(), fp32[column("latency_p99_ms")].parse().unwrap());
    assert!(p50 > 0.0 && p99 >= p50, "p50 {p50} p99 {p99}");

    let best_ptq = rows[1..].iter().map(|r| r[5].parse::<f64>().unwrap()).fold(f64::MIN, f64::max);
    assert!(best_ptq >= accuracy - 1.0, "best PTQ {best_ptq}% is more than 1 point below fp32 {accuracy}%");
    for row in &rows[1..] {
        let fused = &row[2] == "true";
        let float_adds = row[column("float_residual_adds")].split(';').filter(|a| !a.is_empty()).count();
        assert_eq!(float_adds, if fused { 0 } else { 3 }, "{:?}", row);
        assert!(row[column("qdq_pairs")].parse::<u32>().unwrap() > 0);
        if fused {
            // With fusion, every Conv and the Gemm run as int8 kernels on CPU.
            assert_eq!(&row[column("int8_kernel_share")], "1.0", "{:?}", row);
        }
    }

    let jsonl = fs::read_to_string(results.join("runs.jsonl")).unwrap();
    let record: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!(record["evaluation"]["test_images"], 10000);
    assert_eq!(record["evaluation"]["threads"], 2);
    assert_eq!(record["evaluation"]["latency"].as_array().unwrap().len(), 2);
    assert!(record["evaluation"]["onnxruntime"].as_str().unwrap().starts_with("1.31"));

    let summary = fs::read_to_string(results.join("summary.md")).unwrap();
    assert!(summary.contains("| Model | Accuracy | Performance | Note |"));
    assert!(summary.contains(&format!("| fp32 | {accuracy:.2}%; top-5 ")), "{summary}");
    assert!(summary.contains("| calibration | unfused | fused |"));
    // Calibration health flags the input: its background is a point mass
    // at one normalised value, and entropy clips the brighter pixels.
    assert!(summary.contains("## Calibration health\n\n500 calibration samples; 0 exact duplicate(s)"), "{summary}");
    assert!(summary.contains("| tensor | producer | bin 0 | largest other bin | max |"), "{summary}");
    let input = summary.lines().find(|l| l.starts_with("- `input` (graph input): ")).expect("the input is flagged");
    assert!(input.contains("of its non-zero values in one bin") && input.contains("entropy clips at"), "{input}");
    let svg = fs::read_to_string(results.join("accuracy_latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("mse-fused-ptq"));
    // report.html holds every run, and its timeline says the first run
    // made every task (tests/report_html.rs drives the page in Chromium).
    let page = report_data(&results);
    let ids: Vec<&str> = page["rows"].as_array().unwrap().iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 9);
    assert!(ids.contains(&"fp32") && ids.contains(&"mse-fused-ptq"), "{ids:?}");
    let states = |page: &serde_json::Value| -> Vec<String> {
        page["tasks"].as_array().unwrap().iter().map(|t| t[3].as_str().unwrap().to_string()).collect()
    };
    assert!(states(&page).iter().all(|s| s == "ran"), "{:?}", states(&page));

    let second = run_into(&spec, &results);
    assert_eq!(second.status.code(), Some(0));
    assert!(stderr(&second).contains("0 task(s) executed, 21 reused"), "{}", stderr(&second));

    // The rerun made nothing, so the page shows every task as cached.
    assert!(states(&report_data(&results)).iter().all(|s| s == "cached"));

    // `report` regenerates the same table and page from stored results alone.
    let page_text = fs::read_to_string(results.join("report.html")).unwrap();
    fs::remove_file(results.join("runs.csv")).unwrap();
    fs::remove_file(results.join("report.html")).unwrap();
    let report = qsweep(&["report", results.to_str().unwrap()]);
    assert_eq!(report.status.code(), Some(0), "{}", stderr(&report));
    assert_eq!(fs::read_to_string(results.join("runs.csv")).unwrap(), csv_text);
    assert_eq!(fs::read_to_string(results.join("report.html")).unwrap(), page_text);

    // `plan` sees that everything is cached, and that one calibration
    // serves all eight recipes.
    let plan = qsweep(&["plan", spec.to_str().unwrap(), "--json", "--results", results.to_str().unwrap()]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let tasks = plan["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 21);
    assert!(tasks.iter().all(|t| t["cached"] == true), "{plan}");
    let calibrate: Vec<_> = tasks.iter().filter(|t| t["stage"] == "calibrate").collect();
    assert_eq!(calibrate.len(), 1);
    assert_eq!(calibrate[0]["runs"], 8);

    int8_predictions_agree_with_fp32(&results, &plan);
}

/// The JSON document report.html draws.
fn report_data(results: &Path) -> serde_json::Value {
    let page = fs::read_to_string(results.join("report.html")).unwrap();
    let start = page.find(r#"<script type="application/json" id="qsweep-data">"#).expect("the page embeds its data");
    let rest = &page[start..];
    let json = &rest[rest.find('>').unwrap() + 1..rest.find("</script>").unwrap()];
    serde_json::from_str(json).expect("the embedded data is JSON")
}

/// The fused mse engine predicts the same class as fp32 on nearly every
/// test image.
fn int8_predictions_agree_with_fp32(results: &Path, plan: &serde_json::Value) {
    use qsweep::engine::InferenceSession;
    let run = plan["runs"].as_array().unwrap().iter().find(|r| r["id"] == "mse-fused-ptq").unwrap();
    let tasks: Vec<&str> = run["tasks"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    let artifact = |key: &str| results.join("artifacts").join(key);
    let build = tasks[tasks.len() - 2];
    let test_data = tasks[0];
    let images: ndarray::Array4<f32> = prepared_images(results, test_data).0.into_dimensionality().unwrap();
    let mut int8 = InferenceSession::open(&artifact(build).join("model.onnx"), 2, None).unwrap();
    let mut fp32 = InferenceSession::open(&reference_model(), 2, None).unwrap();
    let argmax = |row: ndarray::ArrayView1<f32>| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let mut agree = 0;
    for chunk in images.axis_chunks_iter(ndarray::Axis(0), 500) {
        let (a, b) = (int8.run(chunk).unwrap(), fp32.run(chunk).unwrap());
        agree += a.outer_iter().zip(b.outer_iter()).filter(|(x, y)| argmax(x.view()) == argmax(y.view())).count();
    }
    assert!(agree >= 9_800, "int8 and fp32 agree on only {agree} of 10,000 test images");
}

/// A stage that overruns its timeout is retried as the spec says, then its
/// run is marked failed with the error kept; reports are still written and
/// the exit code says some runs failed.
#[test]
fn a_stage_past_its_timeout_fails_its_run_after_retries() {
    let dir = tempfile::tempdir().unwrap();
    let text = endless_evaluation(&quick_spec_json(r#""retries": 1, "timeout": 1"#));
    let spec = write(dir.path(), "spec.json", &text);
    let results = dir.path().join("results");
    let output = run_into(&spec, &results);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("retry  evaluate") || err.contains("] retry"), "{err}");

    let rows = csv_rows(&results);
    assert_eq!(&rows[0][4], "failed");
    let error = &rows[0][rows[0].len() - 1];
    assert!(error.contains("evaluate failed after 2 attempt(s): timed out after 1s"), "{error}");
    let summary = fs::read_to_string(results.join("summary.md")).unwrap();
    assert!(summary.contains("failed: evaluate failed after 2 attempt(s)"), "{summary}");
}

/// experiments/schema.json is what `qsweep schema` prints.
#[test]
fn committed_schema_matches_the_binary() {
    let printed = qsweep(&["schema"]);
    let committed = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/schema.json")).unwrap();
    assert_eq!(stdout(&printed), committed, "regenerate it: qsweep schema > experiments/schema.json");
}

/// On a terminal the sweep shows a live display (a bar with the ETA and
/// run counts, one line per worker) instead of log lines. `script` gives
/// the run a pseudo-terminal.
#[test]
fn a_terminal_gets_the_live_display() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &quick_spec_json(""));
    let results = dir.path().join("results");
    let command =
        format!("{} run {} --results {} --jobs 2", env!("CARGO_BIN_EXE_qsweep"), spec.display(), results.display());
    let output = Command::new("script").args(["-qec", &command, "/dev/null"]).output().expect("script (util-linux)");
    assert!(output.status.success());
    let screen = String::from_utf8_lossy(&output.stdout);
    for expected in ["tasks", "ETA", "runs: ", "worker 1", "worker 2", "done   evaluate"] {
        assert!(screen.contains(expected), "{expected:?} not on the terminal:\n{screen}");
    }
    assert!(!screen.contains("[worker 1] start"), "plain log lines on a terminal:\n{screen}");
}

/// Every example spec the README points at validates as committed (the
/// image folders are what scripts/setup writes).
#[test]
fn committed_example_specs_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut specs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && p.file_name().unwrap() != "schema.json")
        .collect();
    specs.sort();
    assert!(specs.len() >= 3, "{specs:?}");
    for spec in specs {
        let output = qsweep(&["validate", spec.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(0), "{}: {}", spec.display(), stderr(&output));
    }
}
