//! The Redis backend against a real redis-server on a free loopback port:
//! workers killed mid-task, a killed coordinator, a Redis restart with AOF,
//! and bad connection settings.

mod common;

use std::collections::HashMap;
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
    worker_logging_to(url, prefix, Stdio::null())
}

/// A worker whose log, with each stage's progress, goes to `log`: for the
/// messages of the test that kills workers.
fn logged_worker(url: &str, prefix: &str, log: &Path) -> Child {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    worker_logging_to(url, prefix, file.into())
}

fn worker_logging_to(url: &str, prefix: &str, log: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qsweep"))
        .args(["worker", "--redis", url, "--prefix", prefix, "--lease-secs", "1"])
        .env("QSWEEP_LOG", "info,ort=error")
        .stdout(Stdio::null())
        .stderr(log)
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
    let rows = csv_rows(results);
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

/// The queue entry (id, task key) that a live worker process holds: one
/// pending under any of its consumers, which are named
/// `{host}-{pid}-{slot}`.
fn held_task(redis: &RedisServer, prefix: &str, pid: u32) -> Option<(String, String)> {
    let queue = format!("{prefix}:queue");
    let pending = redis.cli(&["XPENDING", &queue, "workers", "-", "+", "100"]);
    let lines: Vec<&str> = pending.lines().collect();
    // Raw replies: id, consumer, idle ms, deliveries, for each entry.
    let suffix = format!("-{pid}-");
    let entry = lines.chunks(4).find(|e| e.len() == 4 && e[1].contains(&suffix))?[0].to_string();
    let fields = redis.cli(&["XRANGE", &queue, &entry, &entry]);
    let fields: Vec<&str> = fields.lines().collect();
    let key = fields.iter().position(|f| *f == "key").and_then(|i| fields.get(i + 1))?.to_string();
    Some((entry, key))
}

/// Each committed artifact's manifest digest, by task key, as the results
/// directory has them now. Only directories named by their key count: a
/// staging directory holds its manifest before it is renamed, and one left
/// by a killed worker is never committed.
fn manifest_digests(results: &Path) -> HashMap<String, String> {
    let Ok(dir) = std::fs::read_dir(results.join("artifacts")) else { return HashMap::new() };
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("manifest.json")).ok()?).ok()?;
        let key = manifest["key"].as_str().filter(|key| path.ends_with(key))?;
        Some((key.to_string(), manifest["digest"].as_str()?.to_string()))
    })
    .collect()
}

/// Kills that must land on a running task, over all rounds.
const KILLS: usize = 20;

/// Workers are killed with SIGKILL while they hold a task, over and over;
/// their tasks are taken over when the lease runs out. Every task's result
/// is recorded once, its artifact is written once, and it is executed
/// again only as often as kills interrupted it.
#[test]
fn worker_loss_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path(), &[]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut landed, mut tried) = (0, 0);
    let mut round = 0;
    // Bounded, so that kills which never find a task fail the test
    // instead of looping forever.
    while landed < KILLS && round < 8 {
        round += 1;
        let (prefix, sweep) = (format!("loss{round}"), format!("loss{round}"));
        let results = dir.path().join(format!("results{round}"));
        let log = dir.path().join(format!("workers{round}.log"));
        let mut workers = [logged_worker(&redis.url(), &prefix, &log), logged_worker(&redis.url(), &prefix, &log)];
        let mut coordinator = coordinator(&redis.url(), &prefix, &spec(dir.path(), &sweep), &results);
        // Kills that interrupted each task, and the first manifest seen of each.
        let mut interrupted: HashMap<String, u64> = HashMap::new();
        let mut written = HashMap::new();
        // What happened when, for the failure messages.
        let started = Instant::now();
        let mut history = Vec::new();
        let deadline = started + Duration::from_secs(120);
        let status = loop {
            for (key, digest) in manifest_digests(&results) {
                if !written.contains_key(&key) {
                    history.push(format!("{:.2}s artifact {}", started.elapsed().as_secs_f64(), &key[..12]));
                }
                let first = written.entry(key.clone()).or_insert_with(|| digest.clone());
                assert!(
                    *first == digest,
                    "round {round}: the artifact of {key} was written twice\n{}\nthe events:\n{}\nthe workers' log:\n{}",
                    history.join("\n"),
                    redis.cli(&["XRANGE", &format!("{prefix}:sweep:{sweep}:events"), "-", "+"]),
                    fs_text(&log)
                );
            }
            if let Some(status) = coordinator.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the sweep did not finish");
            std::thread::sleep(Duration::from_millis(rng.random_range(100..600)));
            let holders: Vec<usize> =
                (0..workers.len()).filter(|&w| held_task(&redis, &prefix, workers[w].id()).is_some()).collect();
            if landed >= KILLS || holders.is_empty() {
                continue;
            }
            let victim = holders[rng.random_range(0..holders.len())];
            let pid = workers[victim].id();
            sigkill(&mut workers[victim]);
            tried += 1;
            // What is still pending under the dead worker's consumer is the
            // task it held when it died, which may be a newer one than it
            // held a moment ago: it can no longer finish it, and no other
            // worker can claim it before its lease runs out.
            if let Some((_, key)) = held_task(&redis, &prefix, pid) {
                let committed = results.join("artifacts").join(&key).join("manifest.json").exists();
                let at = started.elapsed().as_secs_f64();
                history.push(format!(
                    "{at:.2}s killed {pid} holding {} (its artifact committed: {committed})",
                    &key[..12]
                ));
                *interrupted.entry(key).or_default() += 1;
                landed += 1;
            }
            workers[victim] = logged_worker(&redis.url(), &prefix, &log);
        };
        workers.iter_mut().for_each(sigkill);
        assert!(status.success(), "coordinator failed in round {round}");
        assert_all_runs_ok(&results);
        assert_recorded_once(&redis, &prefix, &sweep);
        assert_eq!(manifest_digests(&results), written, "round {round}: an artifact was replaced at the end");
        // A kill may interrupt a stage (one more execution) or land before
        // or after it; nothing else runs a task again.
        let executions = redis.hash(&format!("{prefix}:sweep:{sweep}:executions"));
        assert_eq!(executions.len(), 9, "round {round}: {executions:?}");
        for (key, count) in &executions {
            let count: u64 = count.parse().unwrap();
            let allowed = 1 + interrupted.get(key).copied().unwrap_or(0);
            assert!(
                (1..=allowed).contains(&count),
                "round {round}: {key} executed {count} times, {} kills landed on it\n{}\nthe workers' log:\n{}",
                allowed - 1,
                history.join("\n"),
                fs_text(&log)
            );
        }
        // Each kill left its stage's staging directory; none outlives the sweep.
        assert_eq!(staging_dirs(&results), Vec::<String>::new(), "round {round}");
    }
    assert!(landed >= KILLS, "only {landed} of {tried} kills landed while the worker held a task, in {round} rounds");
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

/// A port that another redis-server holds is seen as taken (ours exits on
/// its bind failure and says so in its log), not mistaken for ours because
/// a server answers there: tests running in parallel can pick the same
/// free port.
#[test]
fn a_taken_port_is_detected_not_mistaken_for_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let first = RedisServer::start(dir.path(), &[]);
    let second = tempfile::tempdir().unwrap();
    assert!(RedisServer::start_at(second.path(), first.port, &[]).is_none(), "port {} was taken", first.port);
    assert_eq!(first.cli(&["PING"]).trim(), "PONG");
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
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let server = RedisServer::start_tls(
        d,
        &["--tls-cert-file", &cert, "--tls-key-file", &key, "--tls-ca-cert-file", &ca, "--tls-auth-clients", "no"],
    );
    let port = server.port;
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
}
