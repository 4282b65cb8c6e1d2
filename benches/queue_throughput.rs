//! Targets of the Redis backend, side by side with Ray on the same machine:
//! - throughput: at least 5,000 no-op tasks/s end to end through Redis on
//!   loopback with 2 workers, and at least 5x Ray core's trivial tasks/s;
//! - per-task overhead at least 100x lower than Ray Tune's per-trial
//!   overhead (reuse_actors=True);
//! - coordinator memory with a 10,000-run sweep queued: < 300 MB.
//!
//! Starts its own redis-server on a free loopback port and two
//! `qsweep worker` processes; the coordinator runs in this process so its
//! peak RSS can be read. No-op tasks (a stage kind no spec can plan) make
//! the figures about the queue, not about stages.
//!
//!     scripts/setup --with-test-services
//!     python3 -m venv .venv-ray && .venv-ray/bin/pip install "ray[tune]==2.60.*"
//!     cargo bench --bench queue_throughput     # QSWEEP_BENCH_TASKS, RAY_TRIALS
//!     cargo bench --bench queue_throughput -- --smoke   # 200 tasks, 100 chained runs, 16 trials

mod common;

use common::redis_server::RedisServer;
use common::{env_usize, peak_rss_mb, peer_missing, reset_peak_rss, smoke};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use qsweep::artifacts::Artifacts;
use qsweep::coordinator;
use qsweep::plan::{Plan, Sources};
use qsweep::redis_queue::queue::RedisQueue;
use qsweep::redis_queue::{connection, Keys};
use qsweep::store::ResultsDir;
use qsweep::sweep;

/// A plan of `runs` runs, each a chain of `chain` no-op tasks.
fn noop_plan(name: &str, runs: usize, chain: usize) -> Plan {
    let mut tasks = Vec::new();
    let mut planned = Vec::new();
    for run in 0..runs {
        let keys: Vec<String> = (0..chain).map(|step| format!("{run:032x}{step:032x}")).collect();
        for (step, key) in keys.iter().enumerate() {
            let inputs: Vec<serde_json::Value> =
                if step == 0 { vec![] } else { vec![serde_json::json!({"role": "input", "key": keys[step - 1]})] };
            tasks.push(serde_json::json!({"key": key, "stage": "noop", "params": null, "inputs": inputs}));
        }
        planned.push(serde_json::json!({
            "run": {"id": format!("noop{run}"), "kind": {"baseline": "fp32"}, "origin": {"baseline": 0}},
            "tasks": keys,
        }));
    }
    let mut plan: Plan = serde_json::from_value(serde_json::json!({
        "sweep": name,
        "sources": Sources::idx("", ""),
        "tasks": tasks,
        "runs": planned,
    }))
    .unwrap();
    plan.reindex();
    plan
}

fn main() {
    let tasks = env_usize("QSWEEP_BENCH_TASKS", 20_000, 200);
    let trials = env_usize("RAY_TRIALS", 256, 16);
    let chained_runs = if smoke() { 100 } else { 10_000 };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(scratch.path(), &["--appendonly", "no"]);
    let url = redis.url();
    let mut workers: Vec<Child> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_qsweep"))
                .args(["worker", "--redis", &url, "--prefix", "bench"])
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();

    let sweep = Arc::new(sweep::load(&root.join("experiments/fashion-resnet.json")).expect("the reference spec"));
    let results = ResultsDir::create(&scratch.path().join("results")).unwrap();
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let run = |plan: Plan| -> f64 {
        let started = Instant::now();
        let summary = tokio
            .block_on(async {
                let (connection, keys) = (connection::connect(&url).await?, Keys::new("bench"));
                let lease = RedisQueue::claim(connection.clone(), &keys, &plan.sweep).await?;
                let mut queue = RedisQueue::publish(lease, connection, keys, &sweep, &plan, &results, None).await?;
                coordinator::run(&plan, Artifacts::Shared(&results), &mut queue, std::future::pending::<()>()).await
            })
            .unwrap();
        assert_eq!(summary.counts.failed, 0);
        started.elapsed().as_secs_f64()
    };

    let _ = run(noop_plan("warmup", 500, 1));
    let seconds = run(noop_plan("throughput", tasks, 1));
    let per_second = tasks as f64 / seconds;

    reset_peak_rss();
    let chained = run(noop_plan("chained", chained_runs, 3));
    let coordinator_mb = peak_rss_mb();

    workers.iter_mut().for_each(|w| {
        let _ = w.kill();
        let _ = w.wait();
    });
    drop(redis);
    let overhead_ms = 1e3 / per_second;

    println!("Redis queue, loopback, 2 qsweep workers (1 slot each), no-op tasks");
    println!("  qsweep: {tasks} tasks in {seconds:.2} s = {per_second:.0} tasks/s (target >= 5,000)");
    println!(
        "  {chained_runs} runs x 3 chained tasks: {chained:.1} s; coordinator peak RSS {coordinator_mb:.0} MB (target < 300 MB with 10,000)"
    );
    let ray_python = root.join(".venv-ray/bin/python");
    if !ray_python.exists() {
        peer_missing(
            "Ray (.venv-ray)",
            r#"python3 -m venv .venv-ray && .venv-ray/bin/pip install "ray[tune]==2.60.*""#,
        );
        return;
    }
    let peer = Command::new(ray_python)
        .arg(root.join("bench/ray_peer.py"))
        .args([tasks.min(20_000).to_string(), trials.to_string()])
        .stderr(Stdio::null())
        .output()
        .expect("bench/ray_peer.py runs");
    let line = String::from_utf8_lossy(&peer.stdout).lines().last().unwrap_or_default().to_string();
    let ray: serde_json::Value = serde_json::from_str(&line).expect("ray_peer.py's JSON line");
    let ray_tasks = ray["tasks_per_s"].as_f64().unwrap();
    let tune_ms = ray["tune_ms_per_trial"].as_f64().unwrap();
    println!(
        "  Ray {} core: {ray_tasks:.0} trivial remote tasks/s; qsweep / Ray = {:.2}x (target >= 5x)",
        ray["ray"],
        per_second / ray_tasks
    );
    println!(
        "  per task: qsweep {overhead_ms:.3} ms vs Ray Tune {tune_ms:.1} ms per trial ({trials} trials, reuse_actors) = {:.0}x lower (target >= 100x)",
        tune_ms / overhead_ms
    );
}
