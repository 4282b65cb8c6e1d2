//! `qsweep run --backend k8s` end to end against the stand-in API server
//! (tests/stand_in_api), with a real redis-server: the coordinator creates
//! the Job through kube's client, the stand-in runs its pods as local
//! `qsweep worker` processes, and the results arrive through Redis. The
//! failures real clusters have are injected through the stand-in.

mod common;
mod stand_in_api;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::*;
use stand_in_api::{wait_until, Scenario, StandInApi, NAMESPACE};

const PREFIX: &str = "k8stest";

/// A sweep of fp32 and max-fused PTQ, with a resources section.
fn spec(dir: &Path, name: &str, retries: u32) -> PathBuf {
    let text = quick_spec_json(&format!(
        r#""matrix": {{ "calibration": ["max"], "residual_fusion": [true] }},
  "retries": {retries},
  "resources": {{ "gpu": 0, "cpu": "1", "memory": "2Gi", "max_parallel": 2 }}"#
    ))
    .replace(r#""name": "quick""#, &format!(r#""name": "{name}""#));
    write(dir, &format!("{name}.json"), &text)
}

/// Everything one test needs: Redis, the stand-in, a spec, a results dir.
struct Cluster {
    dir: tempfile::TempDir,
    redis: RedisServer,
    api: StandInApi,
    spec: PathBuf,
}

impl Cluster {
    fn start(name: &str, scenario: Scenario, retries: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start(dir.path(), &[]);
        let logs = dir.path().join("pod-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let api = StandInApi::start(scenario, &redis.url(), PREFIX, &logs);
        let spec = spec(dir.path(), name, retries);
        Self { dir, redis, api, spec }
    }

    fn results(&self) -> PathBuf {
        self.dir.path().join("results")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_qsweep"));
        command.args(args).env("KUBECONFIG", self.api.kubeconfig(self.dir.path())).env("QSWEEP_LOG", "warn");
        command
    }

    /// `qsweep run --backend k8s` against this cluster; the namespace is
    /// the default, which is the stand-in's.
    fn coordinator_command(&self) -> Command {
        let results = self.results();
        let mut command = self.command(&[
            "run",
            self.spec.to_str().unwrap(),
            "--backend",
            "k8s",
            "--redis",
            &self.redis.url(),
            "--prefix",
            PREFIX,
            "--image",
            "qsweep:test",
            "--results",
            results.to_str().unwrap(),
        ]);
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        command
    }

    fn coordinator(&self, extra: &[&str]) -> Child {
        self.coordinator_command().args(extra).spawn().unwrap()
    }

    fn run(&self, extra: &[&str]) -> Output {
        self.coordinator(extra).wait_with_output().unwrap()
    }

    fn runs_csv(&self) -> Vec<csv::StringRecord> {
        csv_rows(&self.results())
    }

    fn assert_all_runs_ok(&self) {
        let rows = self.runs_csv();
        assert_eq!(rows.iter().map(|r| r[0].to_string()).collect::<Vec<_>>(), ["fp32", "max-fused-ptq"]);
        assert!(rows.iter().all(|r| &r[4] == "ok"), "{rows:?}");
    }

    fn creates(&self) -> Vec<String> {
        self.api.calls().into_iter().filter(|c| c.starts_with("POST /apis/batch/v1/")).collect()
    }
}

#[test]
fn a_sweep_runs_end_to_end_on_pods_and_parallelism_falls_as_work_runs_out() {
    let cluster = Cluster::start("e2e", Scenario::default(), 1);
    let output = cluster.run(&[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    cluster.assert_all_runs_ok();

    let creates = cluster.creates();
    assert_eq!(creates.len(), 1, "{creates:?}");
    let job = cluster.api.job("qsweep-e2e-1").expect("the Job is named after the sweep and its generation");
    assert_eq!(job["metadata"]["labels"]["qsweep.io/sweep"], "e2e");
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["args"][4], "e2e");
    // Pods leave by themselves once the sweep is done: the Job completes.
    wait_until(30, "the Job to complete", || {
        cluster.api.job("qsweep-e2e-1").unwrap()["status"]["conditions"][0]["type"] == "Complete"
    });
    let patches: Vec<String> = cluster.api.calls().into_iter().filter(|c| c.starts_with("PATCH")).collect();
    assert!(
        patches.iter().any(|p| p.contains(r#"{"spec":{"parallelism":1}}"#)),
        "parallelism was never lowered: {patches:?}"
    );
    assert!(cluster.api.pods_created() >= 2, "max_parallel 2 should start two pods");
}

#[test]
fn an_unschedulable_pod_is_reported_in_progress_and_status() {
    let message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.";
    let scenario = Scenario { unschedulable: Some((Duration::from_secs(6), message.into())), ..Default::default() };
    let cluster = Cluster::start("pending", scenario, 1);
    let coordinator = cluster.coordinator(&["--unschedulable-after", "1"]);
    let mut said = String::new();
    wait_until(30, "qsweep status to show the scheduler's message", || {
        let status = cluster
            .command(&["status", "pending", "--redis", &cluster.redis.url(), "--prefix", PREFIX])
            .output()
            .unwrap();
        said = stdout(&status);
        said.contains(message)
    });
    assert!(said.contains("cluster: pod qsweep-pending-1-p0 unschedulable for"), "{said}");
    let output = coordinator.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains(message), "{}", stderr(&output));
    cluster.assert_all_runs_ok();
}

#[test]
fn an_image_that_cannot_be_pulled_fails_the_sweep_quickly_naming_it() {
    let cluster = Cluster::start("nopull", Scenario { image_pull_fails: true, ..Default::default() }, 1);
    let started = Instant::now();
    let output = cluster.run(&[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    let text = stderr(&output);
    assert!(text.contains("cannot pull image qsweep:test"), "{text}");
    assert!(text.contains("fix:"), "{text}");
    assert!(cluster.api.jobs().is_empty(), "the Job is deleted");
    let deletes: Vec<String> = cluster.api.calls().into_iter().filter(|c| c.starts_with("DELETE")).collect();
    assert!(deletes.iter().all(|d| d.contains("Foreground")), "{deletes:?}");
}

#[test]
fn an_oom_killed_attempt_is_marked_and_retried() {
    let cluster = Cluster::start("oom", Scenario { oom_pods: vec![0], ..Default::default() }, 1);
    let output = cluster.run(&[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("out of memory (pod qsweep-oom-1-p0 was OOMKilled)"), "{text}");
    cluster.assert_all_runs_ok();
    let lost = cluster.redis.hash(&format!("{PREFIX}:sweep:oom:lost-attempts"));
    assert_eq!(lost.values().map(|v| v.as_str()).collect::<Vec<_>>(), ["1"], "{lost:?}");
}

#[test]
fn a_task_killed_for_memory_on_every_attempt_fails_once_retries_are_spent() {
    // Every pod is OOM-killed as soon as it holds a task; retries 1 allows
    // two attempts of the first task, which then fails the sweep's runs.
    let scenario = Scenario { oom_pods: (0..50).collect(), ..Default::default() };
    let cluster = Cluster::start("oomtwice", scenario, 1);
    let output = cluster.run(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let rows = cluster.runs_csv();
    assert!(rows.iter().all(|r| &r[4] == "failed"), "{rows:?}");
    let failures = std::fs::read_dir(cluster.results().join("failures")).unwrap().count();
    assert!(failures >= 1);
    let text = stderr(&output);
    assert!(text.contains("killed at its memory limit (2Gi) on each of 2 attempt(s)"), "{text}");
}

#[test]
fn an_evicted_pod_does_not_count_against_retries() {
    // retries 0: had the eviction counted, the task would have failed.
    let cluster = Cluster::start("evict", Scenario { evicted_pods: vec![0], ..Default::default() }, 0);
    let output = cluster.run(&[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("was disrupted (TerminationByKubelet)"), "{}", stderr(&output));
    cluster.assert_all_runs_ok();
    assert!(cluster.redis.hash(&format!("{PREFIX}:sweep:evict:lost-attempts")).is_empty());
}

#[test]
fn a_restarted_coordinator_adopts_its_job_and_cancel_deletes_it() {
    let cluster = Cluster::start("adopt", Scenario::default(), 1);
    let mut first = cluster.coordinator(&[]);
    wait_until(30, "the Job", || !cluster.api.jobs().is_empty());
    first.kill().unwrap();
    first.wait().unwrap();

    let second = cluster.run(&[]);
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert!(stderr(&second).contains("adopting Job qsweep-adopt-1"), "{}", stderr(&second));
    assert_eq!(cluster.creates().len(), 1, "a restart must not start a second Job");
    cluster.assert_all_runs_ok();

    let cancel = cluster
        .command(&["cancel", "adopt", "--redis", &cluster.redis.url(), "--prefix", PREFIX, "--namespace", NAMESPACE])
        .output()
        .unwrap();
    assert_eq!(cancel.status.code(), Some(0), "{}", stderr(&cancel));
    assert!(stdout(&cancel).contains("deleted Job(s) qsweep-adopt-1"), "{}", stdout(&cancel));
    let deletes: Vec<String> = cluster.api.calls().into_iter().filter(|c| c.starts_with("DELETE")).collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert!(deletes[0].contains(r#""propagationPolicy":"Foreground""#), "{deletes:?}");
    assert!(cluster.api.jobs().is_empty());
}

#[test]
fn missing_permissions_are_named_before_any_job_exists() {
    let scenario = Scenario { denied: vec!["delete jobs.batch".into(), "get pods/log".into()], ..Default::default() };
    let cluster = Cluster::start("rbac", scenario, 1);
    let output = cluster.run(&[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("not allowed in namespace qsweep: delete jobs.batch, get pods/log"), "{text}");
    assert!(text.contains("kubectl apply -k k8s/"), "{text}");
    assert!(cluster.creates().is_empty());
    assert!(!cluster.results().exists(), "a set-up error wrote the results directory");
}

#[test]
fn a_namespace_that_does_not_exist_is_named() {
    let cluster = Cluster::start("nsmissing", Scenario::default(), 1);
    let output = cluster.run(&["--namespace", "nope"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("namespace nope does not exist"), "{}", stderr(&output));
    assert!(!cluster.results().exists(), "a set-up error wrote the results directory");
}

#[test]
fn no_kubeconfig_or_an_unreachable_api_server_exits_2() {
    let cluster = Cluster::start("noconfig", Scenario::default(), 1);
    let home = cluster.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let base = |kubeconfig: &Path| {
        let mut command = cluster.coordinator_command();
        command.env("KUBECONFIG", kubeconfig).env("HOME", &home).env_remove("KUBERNETES_SERVICE_HOST");
        command.output().unwrap()
    };
    let missing = base(&cluster.dir.path().join("no-such-kubeconfig"));
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("no Kubernetes configuration"), "{}", stderr(&missing));

    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unreachable = cluster.dir.path().join("unreachable");
    let text = std::fs::read_to_string(cluster.api.kubeconfig(cluster.dir.path())).unwrap();
    std::fs::write(&unreachable, text.replace(&cluster.api.port.to_string(), &closed_port.to_string())).unwrap();
    let started = Instant::now();
    let output = base(&unreachable);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("cannot reach the Kubernetes API"), "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!cluster.results().exists(), "a set-up error wrote the results directory");
}

/// Against a real cluster, opt-in and never in CI: needs a kubeconfig, the
/// worker image (k8s/Dockerfile) pushed, `kubectl apply -k k8s/` done, and
/// a spec whose paths the pods see (see k8s/README.md).
#[test]
#[ignore = "needs a real cluster: QSWEEP_K8S_E2E=1 cargo test --release --test k8s_control -- --ignored"]
fn a_sweep_runs_on_a_real_cluster() {
    assert_eq!(std::env::var("QSWEEP_K8S_E2E").as_deref(), Ok("1"), "set QSWEEP_K8S_E2E=1 to run this");
    let setting = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("set {name}; see k8s/README.md"));
    let (spec, redis, image) = (setting("QSWEEP_K8S_SPEC"), setting("QSWEEP_K8S_REDIS"), setting("QSWEEP_K8S_IMAGE"));
    let results = setting("QSWEEP_K8S_RESULTS");
    let mut args = vec!["run", &spec, "--backend", "k8s", "--redis", &redis, "--image", &image, "--results", &results];
    let artifacts = std::env::var("QSWEEP_K8S_ARTIFACTS").ok();
    if let Some(store) = &artifacts {
        args.extend(["--artifacts", store]);
    }
    let output = qsweep(&args);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = csv_rows(Path::new(&results));
    assert!(!rows.is_empty() && rows.iter().all(|r| &r[4] == "ok"), "{rows:?}");
}
