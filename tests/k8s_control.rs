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
use serde_json::{json, Value};
use stand_in_api::{judge, restricted_violations, wait_until, Judgement, Scenario, StandInApi, NAMESPACE};

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

    /// Runs the coordinator to its end; one that hangs is killed and
    /// fails the test instead of stalling it.
    fn run(&self, extra: &[&str]) -> Output {
        finish_within(Duration::from_secs(150), self.coordinator(extra))
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
        // A dry run (the coordinator's up-front check) creates nothing.
        let created = |c: &String| c.starts_with("POST /apis/batch/v1/") && !c.contains("dryRun=All");
        self.api.calls().into_iter().filter(created).collect()
    }

    /// Pods the namespace's Pod Security admission refused.
    fn assert_no_pod_refused(&self) {
        let refused = self.api.world.lock().unwrap().rejected_pods.clone();
        assert!(refused.is_empty(), "{refused:?}");
    }
}

fn finish_within(limit: Duration, mut child: Child) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!("the coordinator still ran after {limit:?}:\n{}", stderr(&output));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
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
    cluster.assert_no_pod_refused();
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
    wait_until(10, "the Job to be deleted", || cluster.api.jobs().is_empty());
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
    wait_until(10, "the Job to be deleted", || cluster.api.jobs().is_empty());
}

#[test]
fn missing_permissions_are_named_before_any_job_exists() {
    let denied = ["delete jobs.batch", "get pods/log"].map(|access| (NAMESPACE.to_string(), access.to_string()));
    let scenario = Scenario { denied: denied.to_vec(), ..Default::default() };
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
fn access_is_reviewed_in_the_namespace_the_sweep_uses() {
    // The Role is bound in two namespaces, each lacking something else;
    // a third has no binding at all.
    let scenario = Scenario {
        role_namespaces: vec![NAMESPACE.into(), "elsewhere".into()],
        denied: vec![(NAMESPACE.into(), "get pods/log".into()), ("elsewhere".into(), "delete jobs.batch".into())],
        ..Default::default()
    };
    let cluster = Cluster::start("rbacns", scenario, 1);
    for (extra, missing) in [
        (&[][..], "not allowed in namespace qsweep: get pods/log\n"),
        (&["--namespace", "elsewhere"][..], "not allowed in namespace elsewhere: delete jobs.batch\n"),
        (&["--namespace", "third"][..], "not allowed in namespace third: create jobs.batch, get jobs.batch, list"),
    ] {
        let namespace = extra.get(1).copied().unwrap_or(NAMESPACE);
        cluster.api.world.lock().unwrap().reviews.clear();
        let output = cluster.run(extra);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(missing), "{}", stderr(&output));
        let reviews = cluster.api.world.lock().unwrap().reviews.clone();
        assert_eq!(reviews.len(), qsweep::k8s::cluster::REQUIRED_ACCESS.len());
        assert!(reviews.iter().all(|r| r.starts_with(&format!("{namespace}: "))), "{reviews:?}");
    }
    assert!(cluster.creates().is_empty());
}

#[test]
fn a_missing_secret_fails_the_sweep_within_seconds_naming_it_and_the_fix() {
    let cluster = Cluster::start("nosecret", Scenario { missing_secret: true, ..Default::default() }, 1);
    let started = Instant::now();
    let output = finish_within(Duration::from_secs(60), cluster.coordinator(&[]));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let text = stderr(&output);
    assert!(text.contains(r#"(CreateContainerConfigError): secret "qsweep-redis" not found"#), "{text}");
    assert!(text.contains("fix: create the Secret: kubectl -n qsweep create secret generic qsweep-redis"), "{text}");
    assert!(text.contains("--secret NAME"), "{text}");
    wait_until(10, "the Job to be deleted", || cluster.api.jobs().is_empty());
}

#[test]
fn a_secret_created_while_the_pods_wait_for_it_is_found() {
    let cluster = Cluster::start("latesecret", Scenario { missing_secret: true, ..Default::default() }, 1);
    let coordinator = cluster.coordinator(&[]);
    wait_until(30, "a pod waiting for its Secret", || cluster.api.pods_created() > 0);
    std::thread::sleep(Duration::from_secs(1));
    cluster.api.create_secret(stand_in_api::SECRET);
    let output = finish_within(Duration::from_secs(150), coordinator);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    cluster.assert_all_runs_ok();
}

#[test]
fn a_job_being_deleted_is_not_adopted() {
    // The garbage collector is slow: the old Job lingers, being deleted,
    // while the second coordinator starts.
    let scenario = Scenario { foreground_delay: Duration::from_secs(8), ..Default::default() };
    let cluster = Cluster::start("deleting", scenario, 1);
    let mut first = cluster.coordinator(&[]);
    wait_until(30, "the Job", || !cluster.api.jobs().is_empty());
    first.kill().unwrap();
    first.wait().unwrap();
    cluster.api.delete_job("qsweep-deleting-1", "Foreground");
    let lingering = cluster.api.job("qsweep-deleting-1").expect("a Job deleted in the foreground stays a while");
    assert_eq!(lingering["metadata"]["finalizers"], json!(["foregroundDeletion"]));
    assert!(lingering["metadata"]["deletionTimestamp"].is_string());

    let second = cluster.run(&[]);
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let text = stderr(&second);
    assert!(text.contains("Job qsweep-deleting-1 is being deleted; it is not adopted"), "{text}");
    assert!(!text.contains("adopting"), "{text}");
    assert!(cluster.creates()[1].contains("qsweep-deleting-2"), "{:?}", cluster.creates());
    cluster.assert_all_runs_ok();
    wait_until(15, "the old Job to go", || cluster.api.job("qsweep-deleting-1").is_none());
}

#[test]
fn a_job_deleted_under_the_coordinator_is_followed_by_the_next_generation() {
    let cluster = Cluster::start("deleted", Scenario::default(), 1);
    let coordinator = cluster.coordinator(&[]);
    wait_until(30, "a pod", || cluster.api.pods_created() > 0);
    // As `kubectl delete job` does: the Job is gone at once, its pods after.
    cluster.api.delete_job("qsweep-deleted-1", "Background");
    let output = finish_within(Duration::from_secs(150), coordinator);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("Job qsweep-deleted-1 was deleted with"), "{}", stderr(&output));
    assert!(cluster.api.job("qsweep-deleted-2").is_some());
    cluster.assert_all_runs_ok();
}

#[test]
fn a_sweep_completes_across_watch_timeouts_and_expired_history() {
    // Every watch ends after a second, and the server keeps no history:
    // resuming a watch after any change finds its resourceVersion
    // compacted (410), so the watcher lists again; the OOM kill and every
    // pod's end must still be seen.
    let scenario = Scenario {
        watch_timeout: Some(Duration::from_secs(1)),
        history_kept: Some(0),
        oom_pods: vec![0],
        ..Default::default()
    };
    let cluster = Cluster::start("expiry", scenario, 1);
    let started = Instant::now();
    let output = cluster.run(&[]);
    // A pod deleted during a gap (the Job controller scales down) is seen
    // missing from the relist; unseen, its task would wait for its lease.
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("out of memory (pod qsweep-expiry-1-p0 was OOMKilled)"), "{}", stderr(&output));
    cluster.assert_all_runs_ok();
    let (expired, lists) = {
        let world = cluster.api.world.lock().unwrap();
        (world.expired_watches, world.pod_lists)
    };
    assert!(expired > 0 && lists > 1, "{expired} watch(es) expired, {lists} list(s) of pods\n{}", stderr(&output));
}

/// qsweep's Job, as the stand-in receives it.
fn worker_job_json() -> Value {
    let resources: qsweep::spec::Resources =
        serde_json::from_value(json!({"memory": "2Gi", "max_parallel": 2, "volume_claim": "qsweep-data"})).unwrap();
    let options = qsweep::k8s::JobOptions {
        namespace: NAMESPACE.into(),
        image: "qsweep:test".into(),
        secret: stand_in_api::SECRET.into(),
        prefix: "p".into(),
    };
    serde_json::to_value(qsweep::k8s::worker_job("s", Some(&resources), 2, &options, 1).unwrap()).unwrap()
}

/// A failed worker pod: its container's exit, and a DisruptionTarget
/// condition if it was evicted.
fn failed_pod(exit_code: i64, reason: &str, evicted: bool) -> Value {
    let conditions = if evicted { json!([{"type": "DisruptionTarget", "status": "True"}]) } else { json!([]) };
    json!({"metadata": {"name": "w", "namespace": NAMESPACE}, "status": {"phase": "Failed", "conditions": conditions,
        "containerStatuses": [{"name": "worker", "state": {"terminated": {"exitCode": exit_code, "reason": reason}}}]}})
}

/// What qsweep's Job must make the Job controller do with failed pods.
fn failure_policy_holds(job: &Value) -> Result<(), String> {
    let expect = |pods: &[Value], wanted: &dyn Fn(&Judgement) -> bool, what: &str| {
        let judged = judge(job, &pods.iter().collect::<Vec<_>>());
        if wanted(&judged) {
            Ok(())
        } else {
            Err(format!("{what}: {judged:?}"))
        }
    };
    let evicted = failed_pod(137, "Error", true);
    expect(&[evicted.clone(), evicted], &|j| *j == Judgement { counted: 0, failed: None }, "evictions are ignored")?;
    expect(
        &[failed_pod(2, "Error", false)],
        &|j| {
            j.failed
                .as_ref()
                .is_some_and(|(reason, message)| reason == "PodFailurePolicy" && message.contains("exit code 2"))
        },
        "a configuration error fails the Job",
    )?;
    expect(&[failed_pod(1, "Error", false)], &|j| *j == Judgement { counted: 1, failed: None }, "a crash counts")?;
    expect(
        &[failed_pod(137, "OOMKilled", false)],
        &|j| *j == Judgement { counted: 1, failed: None },
        "an OOM kill counts",
    )?;
    let crashes = vec![failed_pod(1, "Error", false); 7];
    expect(
        &crashes,
        &|j| j.failed.as_ref().is_some_and(|(reason, _)| reason == "BackoffLimitExceeded"),
        "7 crashes exceed the backoff limit",
    )
}

/// A mistake one could make in the Job's failure policy: what, and how.
type Mistake<'a> = (&'a str, &'a dyn Fn(&mut Value));

#[test]
fn the_stand_in_job_controller_applies_the_jobs_own_failure_policy() {
    let job = worker_job_json();
    failure_policy_holds(&job).unwrap();
    // Each of these mistakes in src/k8s/job.rs would be caught.
    let rules = "/spec/podFailurePolicy/rules";
    let wrong: [Mistake; 5] = [
        ("no Ignore rule for disruptions", &|j| drop(j.pointer_mut(rules).unwrap().as_array_mut().unwrap().remove(0))),
        ("NotIn instead of In", &|j| {
            *j.pointer_mut(&format!("{rules}/1/onExitCodes/operator")).unwrap() = json!("NotIn")
        }),
        ("another container's name", &|j| {
            *j.pointer_mut(&format!("{rules}/1/onExitCodes/containerName")).unwrap() = json!("main")
        }),
        ("Count instead of FailJob", &|j| *j.pointer_mut(&format!("{rules}/1/action")).unwrap() = json!("Count")),
        ("a backoffLimit of 0", &|j| *j.pointer_mut("/spec/backoffLimit").unwrap() = json!(0)),
    ];
    for (mistake, make) in wrong {
        let mut broken = job.clone();
        make(&mut broken);
        assert!(failure_policy_holds(&broken).is_err(), "the stand-in missed: {mistake}");
    }
}

#[test]
fn the_worker_pods_meet_the_restricted_pod_security_standard() {
    let job = worker_job_json();
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(restricted_violations(pod), Vec::<String>::new());
    let mut bare = pod.clone();
    bare.as_object_mut().unwrap().remove("securityContext");
    bare["containers"][0].as_object_mut().unwrap().remove("securityContext");
    let violations = restricted_violations(&bare).join(", ");
    for rule in ["allowPrivilegeEscalation", "capabilities", "runAsNonRoot", "seccompProfile"] {
        assert!(violations.contains(rule), "{violations}");
    }
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
