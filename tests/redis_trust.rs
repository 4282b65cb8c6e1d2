//! Redis sweeps that stay true: long-lived workers never act on stale
//! sweep settings, one coordinator per sweep, failed tasks retried on a
//! rerun, and workers that hand their tasks back on SIGTERM (also as PID 1).
//! Real redis-server on a free loopback port, real processes and signals.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::*;
use common::*;

/// fp32 plus max calibration with and without fusion: 9 tasks, 3 runs.
fn spec(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let matrix = r#""matrix": { "calibration": ["max"], "residual_fusion": [false, true] }"#;
    let fields = if extra.is_empty() { matrix.to_string() } else { format!("{matrix}, {extra}") };
    let text = quick_spec_json(&fields).replace(r#""name": "quick""#, &format!(r#""name": "{name}""#));
    write(dir, &format!("{name}.json"), &text)
}

fn worker(url: &str, prefix: &str, extra: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qsweep"))
        .args(["worker", "--redis", url, "--prefix", prefix, "--lease-secs", "30"])
        .args(extra)
        .env("QSWEEP_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn run_args<'a>(url: &'a str, prefix: &'a str, spec: &'a Path, results: &'a Path) -> Vec<&'a str> {
    vec!["run", spec.to_str().unwrap(), "--redis", url, "--prefix", prefix, "--results", results.to_str().unwrap()]
}

fn spawn_run(url: &str, prefix: &str, spec: &Path, results: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qsweep"))
        .args(run_args(url, prefix, spec, results))
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn signal(child: &Child, signal: &str) {
    Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
}

/// Rows of runs.csv as (run, status).
fn statuses(results: &Path) -> Vec<(String, String)> {
    csv_rows(results).iter().map(|r| (r[0].to_string(), r[4].to_string())).collect()
}

fn assert_all_ok(results: &Path, output: &Output) {
    assert_eq!(output.status.code(), Some(0), "{}", stderr(output));
    let rows = statuses(results);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|(_, status)| status == "ok"), "{rows:?}");
    let plan: serde_json::Value = serde_json::from_slice(&fs::read(results.join("plan.json")).unwrap()).unwrap();
    for task in plan["tasks"].as_array().unwrap() {
        let manifest = results.join("artifacts").join(task["key"].as_str().unwrap()).join("manifest.json");
        assert!(manifest.exists(), "{} reported, but {} is missing", task["stage"], manifest.display());
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A long-lived worker serves the same sweep rerun into another results
/// directory, and then with an edited spec under the same name: every
/// artifact is where the coordinator looks, and every run is ok.
#[test]
fn a_long_lived_worker_follows_the_sweep_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let mut worker = worker(&redis.url(), "stale", &[], &dir.path().join("worker.log"));
    let spec = spec(dir.path(), "stale", "");
    for results in ["A", "B"] {
        let results = dir.path().join(results);
        let output = qsweep(&run_args(&redis.url(), "stale", &spec, &results));
        assert_all_ok(&results, &output);
        assert!(stderr(&output).contains("9 task(s) executed, 0 reused"), "{}", stderr(&output));
    }
    // The same name, another spec: other evaluation settings and a method.
    let edited = fs::read_to_string(&spec).unwrap().replace(r#""iterations": 20"#, r#""iterations": 21"#);
    let edited = write(dir.path(), "stale.json", &edited.replace(r#"["max"]"#, r#"["mse"]"#));
    let results = dir.path().join("B");
    let output = qsweep(&run_args(&redis.url(), "stale", &edited, &results));
    assert_all_ok(&results, &output);
    let ids: Vec<String> = statuses(&results).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["fp32", "mse-unfused-ptq", "mse-fused-ptq"]);
    sigkill(&mut worker);
    let log = fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert!(!log.contains("not in the plan"), "{log}");
}

/// Two coordinators on one sweep, started together (into different
/// results directories, so only Redis can tell): one runs, the other exits
/// 2 naming the first's host and PID, and no task runs twice. `qsweep
/// status` names the holder while it runs.
#[test]
fn a_second_redis_coordinator_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let spec = spec(dir.path(), "twice", "");
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let results = [dir.path().join("a"), dir.path().join("b")];
    let mut coordinators = [
        spawn_run(&redis.url(), "twice", &spec, &results[0], &logs[0]),
        spawn_run(&redis.url(), "twice", &spec, &results[1], &logs[1]),
    ];
    let pids = [coordinators[0].id(), coordinators[1].id()];
    let mut holder = String::new();
    wait_until("a coordinator to hold the sweep", Duration::from_secs(30), || {
        let output = qsweep(&["status", "twice", "--redis", &redis.url(), "--prefix", "twice"]);
        holder = stdout(&output);
        holder.contains("coordinator: pid")
    });
    let mut workers = [
        worker(&redis.url(), "twice", &[], &dir.path().join("w1")),
        worker(&redis.url(), "twice", &[], &dir.path().join("w2")),
    ];
    let codes: Vec<Option<i32>> = coordinators.iter_mut().map(|c| c.wait().unwrap().code()).collect();
    workers.iter_mut().for_each(sigkill);
    let texts: Vec<String> = logs.iter().map(|l| fs::read_to_string(l).unwrap()).collect();
    let (winner, loser) = match codes.as_slice() {
        [Some(0), Some(2)] => (0, 1),
        [Some(2), Some(0)] => (1, 0),
        other => panic!("expected one run and one refusal, got {other:?}:\n{texts:?}"),
    };
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let named = format!("pid {} on host {host}", pids[winner]);
    assert!(texts[loser].contains(&named), "{named:?} not in:\n{}", texts[loser]);
    assert!(holder.contains(&named), "status: {holder}");
    assert!(!results[loser].exists(), "the refused coordinator wrote its results directory");
    let executions = redis.hash("twice:sweep:twice:executions");
    assert_eq!(executions.len(), 9, "{executions:?}");
    assert!(executions.values().all(|n| n == "1"), "some task ran twice: {executions:?}");
    // Released on exit: the status says no one holds it now.
    let after = stdout(&qsweep(&["status", "twice", "--redis", &redis.url(), "--prefix", "twice"]));
    assert!(after.contains("coordinator: none"), "{after}");
}

/// A Redis sweep whose task failed (here, timed out with no retries)
/// retries it when rerun, as a local rerun does.
#[test]
fn a_rerun_retries_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let text = endless_evaluation(&quick_spec_json(r#""retries": 0, "timeout": 2"#))
        .replace(r#""name": "quick""#, r#""name": "retry""#);
    let spec = write(dir.path(), "retry.json", &text);
    let results = dir.path().join("results");
    let mut worker = worker(&redis.url(), "retry", &[], &dir.path().join("worker.log"));
    let mut failed = String::new();
    for attempt in ["1", "2"] {
        let output = qsweep(&run_args(&redis.url(), "retry", &spec, &results));
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert_eq!(statuses(&results)[0].1, "failed");
        let state = redis.hash("retry:sweep:retry:state");
        failed = state.into_iter().find(|(_, s)| s == "failed").expect("the evaluation failed").0;
        let executions = redis.hash("retry:sweep:retry:executions");
        assert_eq!(executions.get(&failed).map(String::as_str), Some(attempt), "{executions:?}");
        // What succeeded is not run again.
        assert!(executions.iter().all(|(k, n)| *k == failed || n == "1"), "{executions:?}");
    }
    assert!(!failed.is_empty());
    sigkill(&mut worker);
}

/// A busy worker given SIGTERM stops taking tasks, hands its task back
/// when its drain time is up, leaves no staging directory and exits 0;
/// another worker owns the task within 5 s, not a lease (30 s) later.
#[test]
fn sigterm_hands_the_task_back_within_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let text = endless_evaluation(&quick_spec_json("")).replace(r#""name": "quick""#, r#""name": "term""#);
    let spec = write(dir.path(), "term.json", &text);
    let results = dir.path().join("results");
    let mut busy = worker(&redis.url(), "term", &["--drain-secs", "2"], &dir.path().join("busy.log"));
    let mut coordinator = spawn_run(&redis.url(), "term", &spec, &results, &dir.path().join("run.log"));
    // fp32's three tasks; the third, evaluate, runs until it is stopped.
    let executions = || redis.hash("term:sweep:term:executions");
    wait_until("the evaluation to start", Duration::from_secs(60), || executions().len() == 3);
    let evaluate = redis.hash("term:sweep:term:state").into_iter().find(|(_, s)| s == "queued").unwrap().0;
    std::thread::sleep(Duration::from_millis(500));
    assert!(!staging_dirs(&results).is_empty(), "the evaluation has a staging directory");
    let mut spare = worker(&redis.url(), "term", &[], &dir.path().join("spare.log"));
    std::thread::sleep(Duration::from_millis(500));

    let signalled = Instant::now();
    signal(&busy, "-TERM");
    let status = busy.wait().unwrap();
    let stopped = signalled.elapsed();
    let log = fs::read_to_string(dir.path().join("busy.log")).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(stopped >= Duration::from_secs(2) && stopped < Duration::from_secs(8), "stopped after {stopped:?}\n{log}");
    assert!(log.contains("handed") && log.contains("back to the queue"), "{log}");
    wait_until("the spare worker to take the task", Duration::from_secs(5), || {
        executions().get(&evaluate).map(String::as_str) == Some("2")
    });
    // The busy worker's staging is gone; the spare's is its own.
    let busy_tag = format!("-{}.", busy.id());
    assert!(staging_dirs(&results).iter().all(|d| !d.contains(&busy_tag)), "{:?}", staging_dirs(&results));

    assert!(qsweep(&["cancel", "term", "--redis", &redis.url(), "--prefix", "term"]).status.success());
    let _ = coordinator.wait();
    sigkill(&mut spare);
}

/// As PID 1 (a container without an init), where a signal without a
/// handler is ignored, SIGTERM still stops an idle worker at once.
#[test]
fn a_worker_as_pid_1_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let mut namespace = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_qsweep"), "worker", "--redis", &redis.url()])
        .stderr(fs::File::create(dir.path().join("pid1.log")).unwrap())
        .spawn()
        .expect("unshare (util-linux)");
    let children = format!("/proc/{0}/task/{0}/children", namespace.id());
    let mut worker_pid = String::new();
    wait_until("the worker in its PID namespace", Duration::from_secs(10), || {
        worker_pid = fs::read_to_string(&children).unwrap_or_default().trim().to_string();
        !worker_pid.is_empty()
    });
    let status = fs::read_to_string(format!("/proc/{worker_pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap().to_string();
    assert!(nspid.trim_end().ends_with("\t1"), "not PID 1 in its namespace: {nspid}");
    wait_until("the worker to join the queue", Duration::from_secs(10), || !redis.hash("qsweep:workers").is_empty());
    let signalled = Instant::now();
    Command::new("kill").args(["-TERM", &worker_pid]).status().unwrap();
    let exited = namespace.wait().unwrap();
    assert!(exited.success(), "{}", fs::read_to_string(dir.path().join("pid1.log")).unwrap());
    assert!(signalled.elapsed() < Duration::from_secs(5), "took {:?}", signalled.elapsed());
    assert!(redis.hash("qsweep:workers").is_empty(), "its heartbeat outlived it");
}
