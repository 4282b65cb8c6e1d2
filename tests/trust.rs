//! Results stay true under damage, concurrent coordinators and signals,
//! for local sweeps: the real binary, real processes, real signals.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// fp32 and max-fused-ptq: 7 tasks, one of each stage PTQ has.
fn two_run_spec(dir: &Path) -> PathBuf {
    write(dir, "spec.json", &quick_spec_json(r#""matrix": { "calibration": ["max"], "residual_fusion": [true] }"#))
}

fn run_into(spec: &Path, results: &Path) -> std::process::Output {
    qsweep(&["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()])
}

/// The plan's tasks as `qsweep plan --json` lists them.
fn planned_tasks(spec: &Path, results: &Path) -> Vec<serde_json::Value> {
    let output = qsweep(&["plan", spec.to_str().unwrap(), "--json", "--results", results.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    plan["tasks"].as_array().unwrap().clone()
}

/// The artifact directory of the one task of `stage` whose params match.
fn artifact(results: &Path, tasks: &[serde_json::Value], stage: &str, param: (&str, &str)) -> PathBuf {
    let found: Vec<_> = tasks
        .iter()
        .filter(|t| t["stage"] == stage && t["params"][param.0].as_str().is_none_or(|v| v == param.1))
        .collect();
    assert_eq!(found.len(), 1, "{stage} {param:?}: {found:?}");
    results.join("artifacts").join(found[0]["key"].as_str().unwrap())
}

fn flip_last_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(path, bytes).unwrap();
}

/// (run, status, accuracy) of each row of runs.csv.
fn accuracies(results: &Path) -> Vec<(String, String, String)> {
    csv_rows(results).iter().map(|r| (r[0].to_string(), r[4].to_string(), r[5].to_string())).collect()
}

fn executed(output: &std::process::Output) -> String {
    let err = stderr(output);
    err.lines().find(|l| l.contains("task(s) executed")).unwrap_or_else(|| panic!("no count in:\n{err}")).to_string()
}

/// A finished two-run sweep: where it is, and what it reported.
struct Completed {
    dir: tempfile::TempDir,
    spec: PathBuf,
    results: PathBuf,
    truth: Vec<(String, String, String)>,
    tasks: Vec<serde_json::Value>,
}

fn completed_two_run_sweep() -> Completed {
    let dir = tempfile::tempdir().unwrap();
    let spec = two_run_spec(dir.path());
    let results = dir.path().join("results");
    let first = run_into(&spec, &results);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let truth = accuracies(&results);
    assert!(truth.iter().all(|(_, status, _)| status == "ok"), "{truth:?}");
    let tasks = planned_tasks(&spec, &results);
    Completed { dir, spec, results, truth, tasks }
}

/// A flipped byte in each artifact kind's files, and an edited metric in a
/// manifest: the next run rebuilds exactly those artifacts and what was
/// made from them, reports the true figures, and the run after rebuilds
/// nothing.
#[test]
fn damage_heals_and_reports_stay_true() {
    let Completed { dir: _kept, spec, results, truth, tasks } = completed_two_run_sweep();

    // An edited accuracy in the fp32 evaluation's manifest (evaluate
    // writes no files: its manifest is all it has), and a flipped byte in
    // the calibration histograms.
    let fp32_build = artifact(&results, &tasks, "build", ("precision", "fp32"));
    let fp32_key = fp32_build.file_name().unwrap().to_str().unwrap().to_string();
    let fp32_eval = tasks
        .iter()
        .find(|t| t["stage"] == "evaluate" && t["inputs"].as_array().unwrap().iter().any(|i| i["key"] == fp32_key))
        .map(|t| results.join("artifacts").join(t["key"].as_str().unwrap()))
        .unwrap();
    let manifest = fp32_eval.join("manifest.json");
    let text = fs::read_to_string(&manifest).unwrap();
    let accuracy = serde_json::from_str::<serde_json::Value>(&text).unwrap()["metrics"]["accuracy"].to_string();
    fs::write(&manifest, text.replace(&format!("\"accuracy\": {accuracy}"), "\"accuracy\": 0.9959")).unwrap();
    assert_ne!(fs::read_to_string(&manifest).unwrap(), text, "the edit took");
    flip_last_byte(&artifact(&results, &tasks, "calibrate", ("", "")).join("histograms.json"));

    // fp32's evaluate; calibrate and the int8 build and evaluate made from it.
    let healed = run_into(&spec, &results);
    assert_eq!(healed.status.code(), Some(0), "{}", stderr(&healed));
    assert!(executed(&healed).contains("4 task(s) executed, 3 reused"), "{}", executed(&healed));
    assert_eq!(accuracies(&results), truth, "the reports show the true figures");
    let again = run_into(&spec, &results);
    assert!(executed(&again).contains("0 task(s) executed, 7 reused"), "{}", executed(&again));

    // The test images feed both evaluations; the int8 model only its own.
    flip_last_byte(&artifact(&results, &tasks, "prepare-data", ("split", "test")).join("shard-00000.bin"));
    flip_last_byte(&artifact(&results, &tasks, "build", ("precision", "int8")).join("model.onnx"));
    let healed = run_into(&spec, &results);
    assert_eq!(healed.status.code(), Some(0), "{}", stderr(&healed));
    assert!(executed(&healed).contains("4 task(s) executed, 3 reused"), "{}", executed(&healed));
    assert_eq!(accuracies(&results), truth);
    let again = run_into(&spec, &results);
    assert!(executed(&again).contains("0 task(s) executed, 7 reused"), "{}", executed(&again));
    assert_eq!(staging_dirs(&results), Vec::<String>::new());
}

/// Damage that the cheap cache check cannot see (a flipped byte in a
/// prepared shard whose size and modification time are put back) is found
/// when a stage reads the shard: the shard's artifact is set aside and
/// made again, the stage runs again, and the same run ends with the true
/// figures and nothing left stale.
#[test]
fn damage_found_while_reading_is_healed_in_the_same_run() {
    let Completed { dir: _kept, spec, results, truth, tasks } = completed_two_run_sweep();

    let shard = artifact(&results, &tasks, "prepare-data", ("split", "test")).join("shard-00000.bin");
    let modified = fs::metadata(&shard).unwrap().modified().unwrap();
    let mut bytes = fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&shard, bytes).unwrap();
    fs::File::options().write(true).open(&shard).unwrap().set_modified(modified).unwrap();
    // Every task still looks complete; make one evaluation read the shard.
    let evaluations: Vec<_> = tasks.iter().filter(|t| t["stage"] == "evaluate").collect();
    fs::remove_dir_all(results.join("artifacts").join(evaluations[0]["key"].as_str().unwrap())).unwrap();
    let cached = planned_tasks(&spec, &results).iter().filter(|t| t["cached"] == true).count();
    assert_eq!(cached, tasks.len() - 1, "the cheap check trusts the shard");

    let healed = run_into(&spec, &results);
    assert_eq!(healed.status.code(), Some(0), "{}", stderr(&healed));
    let err = stderr(&healed);
    assert!(err.contains("shard-00000.bin") && err.contains("making it again"), "{err}");
    assert_eq!(accuracies(&results), truth, "the reports show the true figures");
    let again = run_into(&spec, &results);
    assert!(executed(&again).contains("0 task(s) executed, 7 reused"), "{}", executed(&again));
    assert_eq!(staging_dirs(&results), Vec::<String>::new());
}

/// Starts a sweep whose evaluation runs until it is stopped, and waits
/// until it does.
fn start_endless_evaluation(dir: &Path, results: &Path, log: &Path) -> Child {
    let slow = endless_evaluation(&quick_spec_json(""));
    let spec = write(dir, "slow.json", &slow);
    let child = spawn_run(&spec, results, log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(log).unwrap_or_default().contains("start evaluate") {
        assert!(Instant::now() < deadline, "evaluate never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The same sweep with a quick evaluation: what resumes an endless one.
fn resume(dir: &Path, results: &Path) -> std::process::Output {
    let resumed = run_into(&write(dir, "quick.json", &quick_spec_json("")), results);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert!(executed(&resumed).contains("1 task(s) executed, 2 reused"), "{}", executed(&resumed));
    resumed
}

fn spawn_run(spec: &Path, results: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qsweep"))
        .args(["run", spec.to_str().unwrap(), "--results", results.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Two local coordinators on one results directory, started together:
/// one runs every task once, the other exits 2 at once naming the first.
#[test]
fn a_second_local_coordinator_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = two_run_spec(dir.path());
    let results = dir.path().join("results");
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let mut runs = [spawn_run(&spec, &results, &logs[0]), spawn_run(&spec, &results, &logs[1])];
    let pids = [runs[0].id(), runs[1].id()];
    let codes: Vec<Option<i32>> = runs.iter_mut().map(|r| r.wait().unwrap().code()).collect();
    let texts: Vec<String> = logs.iter().map(|l| fs::read_to_string(l).unwrap()).collect();
    let (winner, loser) = match codes.as_slice() {
        [Some(0), Some(2)] => (0, 1),
        [Some(2), Some(0)] => (1, 0),
        other => panic!("expected one run and one refusal, got {other:?}:\n{texts:?}"),
    };
    assert!(texts[loser].contains("is in use by `qsweep run"), "{}", texts[loser]);
    assert!(texts[loser].contains(&format!("pid {}", pids[winner])), "{}", texts[loser]);
    assert!(texts[winner].contains("7 task(s) executed, 0 reused"), "{}", texts[winner]);
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP stop a local sweep promptly: the
/// interrupted stage is not recorded as done, the reports are written for
/// what finished, the exit code names the signal, no staging is left, and
/// the rerun resumes after the finished stages.
#[test]
fn a_stop_signal_writes_reports_and_the_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    for (signal, code) in [("-INT", 130), ("-TERM", 143), ("-HUP", 129)] {
        let results = dir.path().join(format!("results{signal}"));
        let log = dir.path().join(format!("log{signal}"));
        let mut child = start_endless_evaluation(dir.path(), &results, &log);
        std::thread::sleep(Duration::from_millis(300));
        let signalled = Instant::now();
        Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
        let status = child.wait().unwrap();
        let text = fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(code), "{text}");
        assert!(signalled.elapsed() < Duration::from_secs(10), "took {:?}", signalled.elapsed());
        assert!(text.contains("resumes where this stopped"), "{text}");
        assert_eq!(accuracies(&results)[0].1, "pending", "the report is written, and says what is missing");
        assert_eq!(staging_dirs(&results), Vec::<String>::new(), "staging left behind");
        resume(dir.path(), &results);
    }
}

/// A coordinator SIGKILLed mid-stage leaves a staging directory that no
/// live process owns; the next coordinator sweeps it, and never one that
/// a live process owns.
#[test]
fn staging_of_a_killed_coordinator_is_swept_on_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    let mut child = start_endless_evaluation(dir.path(), &results, &dir.path().join("log"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(staging_dirs(&results).len(), 1, "SIGKILL leaves its staging");
    // A live process's staging (this test's own PID) must survive the sweep.
    let live = format!(".staging-000000000000-0-{}.0@{}", std::process::id(), hostname());
    fs::create_dir(results.join("artifacts").join(&live)).unwrap();
    resume(dir.path(), &results);
    assert_eq!(staging_dirs(&results), vec![live]);
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}
