//! The Redis backend against a real redis-server on a free loopback port:
//! workers killed mid-task, a killed coordinator, a Redis restart with AOF,
//! and bad connection settings.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::*;
use common::*;
use rand::{Rng, SeedableRng};

/// The tasks the sweep's state hash records as done.
fn done_tasks(redis: &RedisServer, state_key: &str) -> Vec<String> {
    redis.hash(state_key).into_iter().filter(|(_, s)| s == "done").map(|(k, _)| k).collect()
}

/// Waits until at least `count` tasks are done, so a test can strike mid-sweep.
fn wait_for_done(redis: &RedisServer, state_key: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done_tasks(redis, state_key).len() < count {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// fp32 plus max calibration with and without fusion: 9 tasks, 3 runs.
fn spec(dir: &Path, name: &str) -> PathBuf {
    let text = quick_spec_json(r#""matrix": { "calibration": ["max"], "residual_fusion": [false, true] }"#)
        .replace(r#""name": "quick""#, &format!(r#""name": "{name}""#));
    write(dir, &format!("{name}.json"), &text)
}

fn worker(url: &str, prefix: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qsweep"))
        .args(["worker", "--redis", url, "--prefix", prefix, "--lease-secs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn coordinator(url: &str, prefix: &str, spec: &Path, results: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qsweep"))
        .args([
            "run",
            spec.to_str().unwrap(),
            "--redis",
            url,
            "--prefix",
            prefix,
            "--results",
            results.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn fs_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Every run finished exactly once: one ok row per run in runs.csv.
fn assert_all_runs_ok(results: &Path) {
    let rows = csv_rows(&results);
    let ids: Vec<&str> = rows.iter().map(|r| &r[0]).collect();
    assert_eq!(ids, ["fp32", "max-unfused-ptq", "max-fused-ptq"]);
    assert!(rows.iter().all(|r| &r[4] == "ok"), "{rows:?}");
}

/// Each task's outcome was recorded once: one event per task in the
/// sweep's event stream, and every task done.
fn assert_recorded_once(redis: &RedisServer, prefix: &str, sweep: &str) {
    let state = redis.hash(&format!("{prefix}:sweep:{sweep}:state"));
    assert_eq!(state.len(), 9, "{state:?}");
    assert!(state.values().all(|s| s == "done"), "{state:?}");
    let events = redis.cli(&["XRANGE", &format!("{prefix}:sweep:{sweep}:events"), "-", "+"]);
    for key in state.keys() {
        assert_eq!(events.matches(key.as_str()).count(), 1, "task {key} recorded more than once");
    }
}

/// Workers are killed with SIGKILL at random moments, over and over; their
/// tasks are taken over when the lease runs out, and every task completes
/// once.
#[test]
fn worker_loss_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut kills = 0;
    let mut round = 0;
    while kills < 20 {
        round += 1;
        let (prefix, sweep) = (format!("loss{round}"), format!("loss{round}"));
        let results = dir.path().join(format!("results{round}"));
        let mut workers = [worker(&redis.url(), &prefix), worker(&redis.url(), &prefix)];
        let mut coordinator = coordinator(&redis.url(), &prefix, &spec(dir.path(), &sweep), &results);
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = coordinator.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the sweep did not finish");
            std::thread::sleep(Duration::from_millis(rng.random_range(100..600)));
            if kills < 20 + 5 * (round - 1) && coordinator.try_wait().unwrap().is_none() {
                let victim = rng.random_range(0..workers.len());
                sigkill(&mut workers[victim]);
                workers[victim] = worker(&redis.url(), &prefix);
                kills += 1;
            }
        };
        workers.iter_mut().for_each(sigkill);
        assert!(status.success(), "coordinator failed in round {round}");
        assert_all_runs_ok(&results);
        assert_recorded_once(&redis, &prefix, &sweep);
        // Each kill left its stage's staging directory; none outlives the sweep.
        assert_eq!(staging_dirs(&results), Vec::<String>::new(), "round {round}");
    }
    assert!(kills >= 20);
}

/// The coordinator is killed mid-sweep and started again: it resumes, and
/// no task runs twice (each was executed exactly once).
#[test]
fn coordinator_restart_reruns_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let (prefix, sweep) = ("coord", "coord");
    let results = dir.path().join("results");
    // No retries: a stage that loses its staging directory to the new
    // coordinator would fail its run. Evaluations long enough to be
    // running when the coordinator dies.
    let text = fs_text(&spec(dir.path(), sweep))
        .replace(r#""iterations": 20"#, r#""iterations": 300"#)
        .replace(r#""matrix""#, r#""retries": 0, "matrix""#);
    let spec = write(dir.path(), "coord.json", &text);
    let mut workers = [worker(&redis.url(), prefix), worker(&redis.url(), prefix)];
    let mut first = coordinator(&redis.url(), prefix, &spec, &results);
    let state_key = format!("{prefix}:sweep:{sweep}:state");
    wait_for_done(&redis, &state_key, 3);
    sigkill(&mut first);
    let done_before = done_tasks(&redis, &state_key).len();
    assert!(done_before < 9, "the sweep finished before the coordinator could be killed");

    let second = coordinator(&redis.url(), prefix, &spec, &results);
    let output = second.wait_with_output().unwrap();
    workers.iter_mut().for_each(sigkill);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    assert!(!log.contains("FAILED"), "{log}");
    // The progress shows the workers' liveness beside the run counts.
    assert!(log.contains("2 worker(s) alive"), "{log}");
    assert_all_runs_ok(&results);
    let executions = redis.hash(&format!("{prefix}:sweep:{sweep}:executions"));
    assert_eq!(executions.len(), 9);
    assert!(executions.values().all(|n| n == "1"), "some stage ran twice: {executions:?}");
}

/// Redis restarts (AOF, appendfsync everysec) partway through: the sweep
/// finishes, and what was recorded before the restart is still there.
#[test]
fn redis_restart_with_aof_loses_no_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path(), &["--appendonly", "yes", "--appendfsync", "everysec"]);
    let (prefix, sweep) = ("aof", "aof");
    let results = dir.path().join("results");
    let spec = spec(dir.path(), sweep);
    let mut workers = [worker(&redis.url(), prefix), worker(&redis.url(), prefix)];
    let coordinator = coordinator(&redis.url(), prefix, &spec, &results);
    let state_key = format!("{prefix}:sweep:{sweep}:state");
    wait_for_done(&redis, &state_key, 3);
    let before: Vec<String> = redis.hash(&state_key).into_iter().filter(|(_, s)| s == "done").map(|(k, _)| k).collect();
    redis.restart();
    let output = coordinator.wait_with_output().unwrap();
    workers.iter_mut().for_each(sigkill);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_all_runs_ok(&results);
    let after = redis.hash(&state_key);
    for key in before {
        assert_eq!(
            after.get(&key).map(String::as_str),
            Some("done"),
            "task {key} was recorded before the restart and is gone"
        );
    }
}

/// Each bad connection setting is a clear error and exit code 2, fast.
#[test]
fn bad_connections_exit_2_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &["--requirepass", "right"]);
    let spec = spec(dir.path(), "bad");
    let results = dir.path().join("results");
    let unused_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cases = [
        (format!("redis://:wrong@127.0.0.1:{}", redis.port), "refused the credentials"),
        (format!("redis://127.0.0.1:{}", redis.port), "refused the credentials"),
        (format!("redis://127.0.0.1:{unused_port}"), "cannot reach Redis"),
        ("http://example".to_string(), "is not a Redis URL"),
    ];
    for (url, expected) in cases {
        for args in [
            vec!["run", spec.to_str().unwrap(), "--redis", &url, "--results", results.to_str().unwrap()],
            vec!["worker", "--redis", &url],
            vec!["status", "bad", "--redis", &url],
        ] {
            let started = Instant::now();
            let output = qsweep(&args);
            let err = stderr(&output);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
            assert!(err.contains(expected), "{args:?}: {err}");
            assert!(!err.contains("wrong@"), "the password leaked: {err}");
            assert!(started.elapsed() < Duration::from_secs(15), "{args:?} took {:?}", started.elapsed());
        }
    }
    assert!(!results.join("runs.csv").exists());
}

/// With an object store (here `file://`, the same code path as `s3://`
/// but for the client), workers share nothing but Redis and the store:
/// each has its own cache, fetches its inputs by key and publishes what
/// it builds; the coordinator reports from the store's manifests.
#[test]
fn object_store_artifacts_reach_workers_with_separate_caches() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let prefix = "store";
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let store_url = format!("file://{}", store.display());
    let caches = [dir.path().join("cache-a"), dir.path().join("cache-b")];
    let mut workers: Vec<Child> = caches
        .iter()
        .map(|cache| {
            Command::new(env!("CARGO_BIN_EXE_qsweep"))
                .args(["worker", "--redis", &redis.url(), "--prefix", prefix, "--lease-secs", "1", "--cache"])
                .arg(cache)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let results = dir.path().join("results");
    let spec = spec(dir.path(), "stored");
    let output = qsweep(&[
        "run",
        spec.to_str().unwrap(),
        "--redis",
        &redis.url(),
        "--prefix",
        prefix,
        "--artifacts",
        &store_url,
        "--results",
        results.to_str().unwrap(),
    ]);
    workers.iter_mut().for_each(sigkill);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_all_runs_ok(&results);
    // Every task's artifact is in the store, with its manifest last.
    let published: Vec<_> = std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(published.len(), 9);
    assert!(published.iter().all(|p| p.join("manifest.json").exists()));
    // The coordinator holds manifests only, and no worker shares a cache.
    assert!(!results.join("artifacts").read_dir().unwrap().any(|e| e.unwrap().path().join("model.onnx").exists()));
    let cached: Vec<usize> =
        caches.iter().map(|c| std::fs::read_dir(c.join("stored/artifacts")).map_or(0, |d| d.count())).collect();
    assert!(cached.iter().sum::<usize>() >= 9, "workers built and fetched their artifacts locally: {cached:?}");
}

/// `qsweep status` reports from Redis, and `qsweep cancel` stops a sweep
/// whose coordinator waits for workers that never come.
#[test]
fn status_and_cancel_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let (prefix, sweep) = ("ctl", "ctl");
    let results = dir.path().join("results");
    let mut coordinator = coordinator(&redis.url(), prefix, &spec(dir.path(), sweep), &results);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let output = qsweep(&["status", sweep, "--redis", &redis.url(), "--prefix", prefix]);
        if output.status.success() {
            break stdout(&output);
        }
        assert!(Instant::now() < deadline, "the sweep never appeared: {}", stderr(&output));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.contains("runs: 0 done, 0 failed, 3 remaining"), "{status}");
    assert!(status.contains("workers alive: 0"), "{status}");

    let cancel = qsweep(&["cancel", sweep, "--redis", &redis.url(), "--prefix", prefix]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let started = Instant::now();
    let code = loop {
        if let Some(status) = coordinator.try_wait().unwrap() {
            break status.code();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the coordinator ignored the cancel");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(130));
    let after = stdout(&qsweep(&["status", sweep, "--redis", &redis.url(), "--prefix", prefix]));
    assert!(after.contains("(cancelled)"), "{after}");
    let missing = qsweep(&["status", "nope", "--redis", &redis.url(), "--prefix", prefix]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("no sweep named nope"));
}

/// rediss:// against a real TLS redis-server, verified against a private
/// CA named by QSWEEP_REDIS_CA; without the CA the certificate is refused.
#[test]
fn rediss_verifies_the_server_against_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl").args(args).current_dir(d).stderr(Stdio::null()).status().unwrap();
        assert!(status.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=qsweep test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(d.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--tls-cert-file", "server.pem", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.pem"])
        .args(["--tls-auth-clients", "no"])
        .current_dir(d)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    let url = format!("rediss://localhost:{port}");
    let status = |ca: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_qsweep"));
        command.args(["status", "none", "--redis", &url]).env_remove("QSWEEP_REDIS_CA");
        if let Some(ca) = ca {
            command.env("QSWEEP_REDIS_CA", ca);
        }
        command.output().unwrap()
    };
    // Connected and asked: the only complaint is that the sweep does not exist.
    let trusted = status(Some(&d.join("ca.pem")));
    assert_eq!(trusted.status.code(), Some(2));
    assert!(stderr(&trusted).contains("no sweep named none"), "{}", stderr(&trusted));
    let untrusted = status(None);
    assert_eq!(untrusted.status.code(), Some(2));
    assert!(
        stderr(&untrusted).contains("cannot be verified") && stderr(&untrusted).contains("QSWEEP_REDIS_CA"),
        "{}",
        stderr(&untrusted)
    );
    let _ = server.kill();
    let _ = server.wait();
}
