//! A stand-in Kubernetes API server for the control-loop tests: no real
//! cluster runs on the CI machines, so this speaks the REST paths qsweep
//! uses (Jobs, pods with list and watch, pod logs, access reviews) well
//! enough for kube's client and watcher, and plays the Job controller and
//! the kubelet: each pod of a created Job runs as a local process with the
//! pod's command, args and environment (the Secret's keys, the downward
//! API's pod name), so a sweep really passes coordinator -> API -> pods ->
//! Redis -> results.
//!
//! It keeps the rules a real cluster keeps, so that a Job or a client that
//! breaks them fails here too: the Job controller applies the Job's own
//! `podFailurePolicy` and `backoffLimit`; the namespace enforces the
//! "restricted" Pod Security Standard (as k8s/namespace.yaml has it do),
//! so a pod that breaks it is never created; a pod's envFrom Secret must
//! exist; a container with `readOnlyRootFilesystem` can write its /tmp
//! (TMPDIR) only if an emptyDir is mounted there; deletion follows the
//! propagation policy (Foreground: the Job stays, with a deletionTimestamp
//! and the foregroundDeletion finalizer, until its pods are gone;
//! Background: the Job goes at once and its pods after it; none or Orphan,
//! batch/v1's default: the pods stay); watches end after the client's
//! timeoutSeconds or the server's own limit, and one resumed from a
//! compacted resourceVersion gets an ERROR event with a 410 Expired Status;
//! access reviews are answered for the namespace they name.
//!
//! A `Scenario` injects the failures real clusters have: a pod the
//! scheduler cannot place for a while, an image that cannot be pulled, a
//! pod killed at its memory limit (exit 137, OOMKilled) or evicted while it
//! holds a task, a missing Secret, permissions the coordinator lacks in a
//! namespace, watches cut short with their history compacted, and a
//! garbage collector slow to remove a Job deleted in the foreground.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Failures to inject; pods are numbered in creation order from 0.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    /// Pod 0 stays unschedulable this long, with this scheduler message.
    pub unschedulable: Option<(Duration, String)>,
    /// Every pod's image fails to pull.
    pub image_pull_fails: bool,
    /// Pods with these numbers are OOM-killed once they hold a task.
    pub oom_pods: Vec<usize>,
    /// Pods with these numbers are evicted once they hold a task.
    pub evicted_pods: Vec<usize>,
    /// The Secret the pods' environment comes from (`SECRET`) does not
    /// exist: they wait in CreateContainerConfigError, as the kubelet
    /// keeps them, until it is created (`StandInApi::create_secret`).
    pub missing_secret: bool,
    /// Namespaces where the tester's Role is bound (k8s/rbac.yaml binds it
    /// in qsweep); empty means a ClusterRole binding: every namespace.
    pub role_namespaces: Vec<String>,
    /// Accesses the tester lacks in a namespace, e.g. ("qsweep", "delete jobs.batch").
    pub denied: Vec<(String, String)>,
    /// The server's own limit on a watch, below the client's timeoutSeconds.
    pub watch_timeout: Option<Duration>,
    /// How many changes the server keeps for watches to resume from; a
    /// watch from an older resourceVersion gets 410 Gone (etcd compaction).
    pub history_kept: Option<usize>,
    /// How long the garbage collector takes to remove a Job deleted in the
    /// foreground once its pods are gone.
    pub foreground_delay: Duration,
}

pub const NAMESPACE: &str = "qsweep";
pub const SECRET: &str = "qsweep-redis";
/// A real API server ends a watch after a random 30 to 60 minutes.
const SERVER_WATCH_LIMIT: Duration = Duration::from_secs(1800);

pub struct StandInApi {
    pub port: u16,
    pub world: Arc<Mutex<World>>,
    runtime: Option<tokio::runtime::Runtime>,
}

pub struct World {
    resource_version: u64,
    jobs: BTreeMap<String, Value>,
    /// Jobs deleted in the foreground, and since when their pods are gone.
    deleting: BTreeMap<String, Option<Instant>>,
    pods: BTreeMap<String, SimulatedPod>,
    secrets: BTreeSet<String>,
    history: Vec<(u64, &'static str, &'static str, Value)>,
    /// The newest resourceVersion dropped from `history`.
    compacted: u64,
    watchers: Vec<Watcher>,
    /// Every mutating call, "VERB path body", for the tests to inspect.
    pub calls: Vec<String>,
    /// Every access review, "namespace: verb resource".
    pub reviews: Vec<String>,
    /// Lists of pods (the watcher's initial list and every relist).
    pub pod_lists: usize,
    /// Watches answered 410 Gone.
    pub expired_watches: usize,
    /// Why pod creation was refused (Pod Security admission).
    pub rejected_pods: BTreeSet<String>,
    scenario: Scenario,
    pods_created: usize,
    redis: redis::Connection,
    redis_url: String,
    prefix: String,
    binary: PathBuf,
    logs: PathBuf,
}

struct SimulatedPod {
    job: String,
    number: usize,
    created: Instant,
    child: Option<Child>,
    log: PathBuf,
    object: Value,
}

struct Watcher {
    kind: &'static str,
    selector: Vec<(String, String)>,
    sender: mpsc::UnboundedSender<Bytes>,
}

type Body = BoxBody<Bytes, Infallible>;

impl StandInApi {
    /// Starts the server on a free loopback port; pods reach Redis at
    /// `redis_url` under `prefix` and write their logs under `logs`.
    pub fn start(scenario: Scenario, redis_url: &str, prefix: &str, logs: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let world = Arc::new(Mutex::new(World {
            resource_version: 1,
            jobs: BTreeMap::new(),
            deleting: BTreeMap::new(),
            pods: BTreeMap::new(),
            secrets: if scenario.missing_secret { BTreeSet::new() } else { BTreeSet::from([SECRET.to_string()]) },
            history: Vec::new(),
            compacted: 0,
            watchers: Vec::new(),
            calls: Vec::new(),
            reviews: Vec::new(),
            pod_lists: 0,
            expired_watches: 0,
            rejected_pods: BTreeSet::new(),
            scenario,
            pods_created: 0,
            redis: redis::Client::open(redis_url).unwrap().get_connection().unwrap(),
            redis_url: redis_url.to_string(),
            prefix: prefix.to_string(),
            binary: PathBuf::from(env!("CARGO_BIN_EXE_qsweep")),
            logs: logs.to_path_buf(),
        }));
        let serving = world.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let world = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| handle(world.clone(), request));
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        let controlled = world.clone();
        runtime.spawn(async move {
            loop {
                controlled.lock().unwrap().reconcile();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { port, world, runtime: Some(runtime) }
    }

    /// A kubeconfig whose current context is this server.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://127.0.0.1:{}\n\
             users:\n- name: tester\n  user:\n    token: stand-in-token\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: tester\n    namespace: {NAMESPACE}\n\
             current-context: stand-in\n",
            self.port
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn calls(&self) -> Vec<String> {
        self.world.lock().unwrap().calls.clone()
    }

    /// Names of the Jobs that exist now.
    pub fn jobs(&self) -> Vec<String> {
        self.world.lock().unwrap().jobs.keys().cloned().collect()
    }

    pub fn job(&self, name: &str) -> Option<Value> {
        self.world.lock().unwrap().jobs.get(name).cloned()
    }

    pub fn pods_created(&self) -> usize {
        self.world.lock().unwrap().pods_created
    }

    /// `kubectl delete job NAME --cascade=foreground|background|orphan`,
    /// as someone other than the coordinator would.
    pub fn delete_job(&self, name: &str, propagation: &str) {
        self.world.lock().unwrap().delete_job(name, propagation);
    }

    /// `kubectl create secret generic NAME --from-literal=REDIS_URL=...`.
    pub fn create_secret(&self, name: &str) {
        self.world.lock().unwrap().secrets.insert(name.to_string());
    }
}

impl Drop for StandInApi {
    fn drop(&mut self) {
        // A test that failed holding the lock must still end the pods.
        let mut world = self.world.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for pod in world.pods.values_mut() {
            if let Some(mut child) = pod.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        drop(world);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn handle(world: Arc<Mutex<World>>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    let path: Vec<&str> = parts.uri.path().trim_matches('/').split('/').collect();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut world = world.lock().unwrap();
    if parts.method != Method::GET {
        world.calls.push(format!("{} {} {}", parts.method, parts.uri, body));
    }
    let response = match (&parts.method, path.as_slice()) {
        (&Method::POST, ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]) => world.review(body),
        (method, ["apis", "batch", "v1", "namespaces", namespace, "jobs", rest @ ..]) => {
            if *namespace != NAMESPACE {
                if method == Method::POST {
                    status(404, "NotFound", &format!("namespaces \"{namespace}\" not found"))
                } else {
                    list("JobList", Vec::new(), world.resource_version)
                }
            } else {
                match (method, rest) {
                    (&Method::GET, []) => world.list_or_watch("jobs", &query),
                    (&Method::POST, []) => world.create_job(body, query.get("dryRun").is_some_and(|v| v == "All")),
                    (&Method::GET, [name]) => world.jobs.get(*name).map_or_else(|| not_found(name), |j| ok(j.clone())),
                    (&Method::PATCH, [name]) => world.patch_job(name, body),
                    (&Method::DELETE, [name]) => {
                        let policy =
                            body["propagationPolicy"].as_str().or(query.get("propagationPolicy").map(String::as_str));
                        world.delete_job(name, policy.unwrap_or("Orphan"))
                    }
                    _ => status(405, "MethodNotAllowed", "not in the stand-in"),
                }
            }
        }
        (&Method::GET, ["api", "v1", "namespaces", _, "pods"]) => world.list_or_watch("pods", &query),
        (&Method::GET, ["api", "v1", "namespaces", _, "pods", name, "log"]) => world.log(name, &query),
        _ => status(404, "NotFound", &format!("the stand-in has no {}", parts.uri.path())),
    };
    Ok(response)
}

fn ok(value: Value) -> Response<Body> {
    respond(StatusCode::OK, value)
}

fn respond(code: StatusCode, value: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    respond(
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn not_found(name: &str) -> Response<Body> {
    status(404, "NotFound", &format!("jobs.batch \"{name}\" not found"))
}

fn list(kind: &str, items: Vec<Value>, resource_version: u64) -> Response<Body> {
    ok(
        json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": resource_version.to_string()}, "items": items}),
    )
}

fn parse_selector(query: &HashMap<String, String>) -> Vec<(String, String)> {
    query
        .get("labelSelector")
        .map(|s| s.split(',').filter_map(|p| p.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
        .unwrap_or_default()
}

fn matches(object: &Value, selector: &[(String, String)]) -> bool {
    selector.iter().all(|(k, v)| object["metadata"]["labels"][k].as_str() == Some(v))
}

impl World {
    fn review(&mut self, mut review: Value) -> Response<Body> {
        let attributes = &review["spec"]["resourceAttributes"];
        let field = |name: &str| attributes[name].as_str().unwrap_or("").to_string();
        let resource = if field("group").is_empty() {
            field("resource")
        } else {
            format!("{}.{}", field("resource"), field("group"))
        };
        let mut name = format!("{} {resource}", field("verb"));
        if !field("subresource").is_empty() {
            name = format!("{name}/{}", field("subresource"));
        }
        // A Role grants only in its own namespace; a review without one
        // asks about every namespace, which only a ClusterRole grants.
        let namespace = field("namespace");
        let roles = &self.scenario.role_namespaces;
        let bound = roles.is_empty() || roles.contains(&namespace);
        let allowed = bound && !self.scenario.denied.contains(&(namespace.clone(), name.clone()));
        self.reviews.push(format!("{namespace}: {name}"));
        review["status"] = json!({"allowed": allowed});
        ok(review)
    }

    fn list_or_watch(&mut self, kind: &'static str, query: &HashMap<String, String>) -> Response<Body> {
        let selector = parse_selector(query);
        let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        if !watching {
            if kind == "pods" {
                self.pod_lists += 1;
            }
            let items: Vec<Value> = match kind {
                "jobs" => self.jobs.values().filter(|j| matches(j, &selector)).cloned().collect(),
                _ => self.pods.values().map(|p| &p.object).filter(|p| matches(p, &selector)).cloned().collect(),
            };
            return list(if kind == "jobs" { "JobList" } else { "PodList" }, items, self.resource_version);
        }
        let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let asked = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).map(Duration::from_secs);
        let limit = [asked, self.scenario.watch_timeout, Some(SERVER_WATCH_LIMIT)].into_iter().flatten().min().unwrap();
        let (sender, mut receiver) = mpsc::unbounded_channel::<Bytes>();
        if since < self.compacted {
            // The changes since `since` are gone: the client must list again.
            self.expired_watches += 1;
            let message = format!("too old resource version: {since} ({})", self.compacted);
            let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": "Expired", "code": 410});
            let _ = sender.send(event_line("ERROR", &gone));
        } else {
            for (version, event, of_kind, object) in &self.history {
                if *version > since && *of_kind == kind && matches(object, &selector) {
                    let _ = sender.send(event_line(event, object));
                }
            }
            self.watchers.push(Watcher { kind, selector, sender });
        }
        let lines = futures::stream::poll_fn(move |cx| {
            receiver.poll_recv(cx).map(|line| line.map(|l| Ok::<_, Infallible>(Frame::data(l))))
        });
        // Ending the body ends the watch, as the server does at its limit;
        // the watcher in the world then finds its receiver gone.
        let stream = futures::StreamExt::take_until(lines, tokio::time::sleep(limit));
        Response::builder()
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    }

    /// Records a change, bumps the resource version, and tells watchers.
    fn changed(&mut self, event: &'static str, kind: &'static str, object: &mut Value) {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.history.push((self.resource_version, event, kind, object.clone()));
        if let Some(kept) = self.scenario.history_kept {
            let dropped = self.history.len().saturating_sub(kept);
            if let Some((newest_dropped, ..)) = self.history.drain(..dropped).next_back() {
                self.compacted = newest_dropped;
            }
        }
        let line = event_line(event, object);
        self.watchers
            .retain(|w| w.kind != kind || !matches(object, &w.selector) || w.sender.send(line.clone()).is_ok());
    }

    /// Validates and stores a Job; a dry run (`dryRun=All`) validates
    /// alike and stores nothing, as the API server does.
    fn create_job(&mut self, mut job: Value, dry_run: bool) -> Response<Body> {
        if let (Value::Null, Some(prefix)) = (&job["metadata"]["name"], job["metadata"]["generateName"].as_str()) {
            let name = format!("{prefix}{:05}", self.resource_version);
            job["metadata"]["name"] = json!(name);
        }
        let name = job["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if self.jobs.contains_key(&name) {
            return status(409, "AlreadyExists", &format!("jobs.batch \"{name}\" already exists"));
        }
        let restart = &job["spec"]["template"]["spec"]["restartPolicy"];
        if !job["spec"]["podFailurePolicy"].is_null() && restart != "Never" {
            return status(
                422,
                "Invalid",
                &format!("Job.batch \"{name}\" is invalid: spec.podFailurePolicy: Invalid value: only \"Never\" is supported when podFailurePolicy is specified"),
            );
        }
        if dry_run {
            return respond(StatusCode::CREATED, job);
        }
        job["metadata"]["uid"] = json!(format!("uid-{name}"));
        job["status"] = json!({});
        self.changed("ADDED", "jobs", &mut job);
        self.jobs.insert(name, job.clone());
        respond(StatusCode::CREATED, job)
    }

    fn patch_job(&mut self, name: &str, patch: Value) -> Response<Body> {
        let Some(mut job) = self.jobs.get(name).cloned() else { return not_found(name) };
        if let Some(parallelism) = patch["spec"]["parallelism"].as_i64() {
            job["spec"]["parallelism"] = json!(parallelism);
        }
        self.changed("MODIFIED", "jobs", &mut job);
        self.jobs.insert(name.to_string(), job.clone());
        ok(job)
    }

    /// Deletes a Job as the garbage collector would for `propagation`.
    fn delete_job(&mut self, name: &str, propagation: &str) -> Response<Body> {
        let Some(mut job) = self.jobs.get(name).cloned() else { return not_found(name) };
        let pods: Vec<String> = self.pods.iter().filter(|(_, p)| p.job == name).map(|(n, _)| n.clone()).collect();
        match propagation {
            "Foreground" => {
                if job["metadata"]["deletionTimestamp"].is_null() {
                    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
                    job["metadata"]["deletionTimestamp"] = json!(now);
                    job["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
                    self.changed("MODIFIED", "jobs", &mut job);
                    self.jobs.insert(name.to_string(), job.clone());
                    self.deleting.insert(name.to_string(), None);
                }
                // The Job goes in `reconcile`, once these are gone.
                for pod in pods {
                    self.remove_pod(&pod);
                }
            }
            background_or_orphan => {
                self.jobs.remove(name);
                self.changed("DELETED", "jobs", &mut job);
                if background_or_orphan == "Background" {
                    for pod in pods {
                        self.remove_pod(&pod);
                    }
                }
            }
        }
        ok(job)
    }

    /// The garbage collector's last step of a foreground deletion: the
    /// finalizer comes off, and the Job goes, once its pods are gone.
    fn finish_deletions(&mut self) {
        let delay = self.scenario.foreground_delay;
        let names: Vec<String> = self.deleting.keys().cloned().collect();
        for name in names {
            if self.pods.values().any(|p| p.job == name) {
                continue;
            }
            let since = *self.deleting.get_mut(&name).unwrap().get_or_insert_with(Instant::now);
            if since.elapsed() >= delay {
                self.deleting.remove(&name);
                if let Some(mut job) = self.jobs.remove(&name) {
                    job["metadata"]["finalizers"] = json!([]);
                    self.changed("DELETED", "jobs", &mut job);
                }
            }
        }
    }

    fn remove_pod(&mut self, name: &str) {
        if let Some(mut pod) = self.pods.remove(name) {
            if let Some(mut child) = pod.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            self.changed("DELETED", "pods", &mut pod.object);
        }
    }

    fn log(&mut self, name: &str, query: &HashMap<String, String>) -> Response<Body> {
        let Some(pod) = self.pods.get(name) else { return not_found(name) };
        let text = std::fs::read_to_string(&pod.log).unwrap_or_default();
        let tail: usize = query.get("tailLines").and_then(|t| t.parse().ok()).unwrap_or(usize::MAX);
        let lines: Vec<&str> = text.lines().collect();
        let kept = lines[lines.len().saturating_sub(tail)..].join("\n");
        Response::builder().header("content-type", "text/plain").body(Full::new(Bytes::from(kept)).boxed()).unwrap()
    }

    /// One pass of the Job controller and the kubelet.
    fn reconcile(&mut self) {
        let names: Vec<String> = self.pods.keys().cloned().collect();
        for name in names {
            self.step_pod(&name);
        }
        let jobs: Vec<String> = self.jobs.keys().cloned().collect();
        for name in jobs {
            self.step_job(&name);
        }
        self.finish_deletions();
    }

    fn update_pod(&mut self, name: &str, change: impl FnOnce(&mut Value)) {
        let mut object = self.pods[name].object.clone();
        change(&mut object);
        self.changed("MODIFIED", "pods", &mut object);
        self.pods.get_mut(name).unwrap().object = object;
    }

    fn step_pod(&mut self, name: &str) {
        let pod = &self.pods[name];
        let (number, age, phase) = (pod.number, pod.created.elapsed(), pod.object["status"]["phase"].clone());
        let image = pod.object["spec"]["containers"][0]["image"].as_str().unwrap_or_default().to_string();
        match phase.as_str() {
            Some("Pending") => {
                if let Some((wait, message)) = self.scenario.unschedulable.clone().filter(|_| number == 0) {
                    if age < wait {
                        if pod.object["status"]["conditions"].as_array().is_none_or(|c| c.is_empty()) {
                            self.update_pod(name, |p| {
                                p["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "False",
                                    "reason": "Unschedulable", "message": message}]);
                            });
                        }
                        return;
                    }
                }
                if self.scenario.image_pull_fails {
                    let reason = if age < Duration::from_millis(500) { "ErrImagePull" } else { "ImagePullBackOff" };
                    if pod.object["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] != reason {
                        self.update_pod(name, |p| {
                            p["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True"}]);
                            p["status"]["containerStatuses"] = json!([container_status(
                                &image,
                                json!({"waiting": {
                                "reason": reason, "message": format!("failed to pull image \"{image}\": not found")}})
                            )]);
                        });
                    }
                    return;
                }
                if let Some(secret) = self.missing_secret(name) {
                    let reason = "CreateContainerConfigError";
                    if pod.object["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] != reason {
                        self.update_pod(name, |p| {
                            p["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True"}]);
                            p["status"]["containerStatuses"] = json!([container_status(
                                &image,
                                json!({"waiting": {"reason": reason, "message": format!("secret \"{secret}\" not found")}})
                            )]);
                        });
                    }
                    return;
                }
                self.run_pod(name, &image);
            }
            Some("Running") => {
                let exited = self.pods.get_mut(name).unwrap().child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if let Some(exit) = exited {
                    let code = exit.code().unwrap_or(137);
                    self.pods.get_mut(name).unwrap().child = None;
                    self.end_pod(name, code, if code == 0 { "Completed" } else { "Error" }, None);
                } else if self.scenario.oom_pods.contains(&number) && self.holds_a_task(name) {
                    self.kill(name);
                    self.end_pod(name, 137, "OOMKilled", None);
                } else if self.scenario.evicted_pods.contains(&number) && self.holds_a_task(name) {
                    self.kill(name);
                    self.end_pod(name, 137, "Error", Some("Evicted"));
                }
            }
            _ => {}
        }
    }

    /// A Secret the pod's envFrom needs that does not exist; the kubelet
    /// looks again on each pass, as it retries.
    fn missing_secret(&self, pod: &str) -> Option<String> {
        let container = &self.pods[pod].object["spec"]["containers"][0];
        container["envFrom"].as_array().into_iter().flatten().find_map(|source| {
            let name = source["secretRef"]["name"].as_str()?;
            let optional = source["secretRef"]["optional"] == true;
            (!optional && !self.secrets.contains(name)).then(|| name.to_string())
        })
    }

    /// Whether a worker of this pod has taken a queue entry.
    fn holds_a_task(&mut self, pod: &str) -> bool {
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(format!("{}:queue", self.prefix))
            .arg("workers")
            .arg("-")
            .arg("+")
            .arg(100)
            .query(&mut self.redis)
            .unwrap_or_default();
        pending.iter().any(|(_, consumer, _, _)| consumer.starts_with(&format!("{pod}-")))
    }

    fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.pods.get_mut(name).unwrap().child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn run_pod(&mut self, name: &str, image: &str) {
        let pod = &self.pods[name];
        let container = &pod.object["spec"]["containers"][0];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
        };
        let command = strings(&container["command"]);
        assert_eq!(command, ["qsweep"], "the Job's command");
        let mut process = Command::new(&self.binary);
        process.args(strings(&container["args"])).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        for variable in container["env"].as_array().into_iter().flatten() {
            let value = match variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => name.to_string(),
                Some(other) => panic!("the stand-in resolves no fieldRef {other}"),
                None => variable["value"].as_str().unwrap_or_default().to_string(),
            };
            process.env(variable["name"].as_str().unwrap(), value);
        }
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let secret = source["secretRef"]["name"].as_str().expect("the stand-in resolves only secretRef in envFrom");
            // Every Secret the stand-in holds is a qsweep-redis one: REDIS_URL.
            if self.secrets.contains(secret) {
                process.env("REDIS_URL", &self.redis_url);
            }
        }
        process.env("TMPDIR", self.tmp_dir(name));
        let log = std::fs::File::create(&pod.log).unwrap();
        let child = process.stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).spawn().unwrap();
        self.pods.get_mut(name).unwrap().child = Some(child);
        self.update_pod(name, |p| {
            p["status"]["phase"] = json!("Running");
            p["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True"}]);
            p["status"]["containerStatuses"] =
                json!([container_status(image, json!({"running": {"startedAt": "2026-11-27T00:00:00Z"}}))]);
        });
    }

    /// The pod's /tmp, as TMPDIR: an emptyDir of its own where one is
    /// mounted there; else the image's root filesystem, which is the test
    /// machine's temp dir unless `readOnlyRootFilesystem` makes it
    /// unwritable (a path no write succeeds under).
    fn tmp_dir(&self, pod: &str) -> PathBuf {
        let spec = &self.pods[pod].object["spec"];
        let container = &spec["containers"][0];
        let mounted = container["volumeMounts"].as_array().into_iter().flatten().find(|m| m["mountPath"] == "/tmp");
        let empty_dir = mounted.is_some_and(|mount| {
            let volumes = spec["volumes"].as_array().into_iter().flatten();
            volumes.filter(|v| v["name"] == mount["name"]).any(|v| v["emptyDir"].is_object())
        });
        if empty_dir {
            let dir = self.logs.join(format!("{pod}-tmp"));
            std::fs::create_dir_all(&dir).unwrap();
            dir
        } else if container["securityContext"]["readOnlyRootFilesystem"] == true {
            PathBuf::from("/proc/read-only-root-filesystem/tmp")
        } else {
            std::env::temp_dir()
        }
    }

    fn end_pod(&mut self, name: &str, exit_code: i32, reason: &str, evicted: Option<&str>) {
        let image = self.pods[name].object["spec"]["containers"][0]["image"].as_str().unwrap_or_default().to_string();
        self.update_pod(name, |p| {
            p["status"]["phase"] = json!(if exit_code == 0 { "Succeeded" } else { "Failed" });
            p["status"]["containerStatuses"] = json!([container_status(
                &image,
                json!({"terminated": {
                "exitCode": exit_code, "reason": reason}})
            )]);
            if let Some(why) = evicted {
                p["status"]["reason"] = json!(why);
                p["status"]["conditions"] = json!([{"type": "DisruptionTarget", "status": "True",
                    "reason": "TerminationByKubelet"}, {"type": "PodScheduled", "status": "True"}]);
            }
        });
    }

    /// The Job controller for the work-queue pattern: keep `parallelism`
    /// pods until one succeeds; judge the failed ones by the Job's own
    /// podFailurePolicy and backoffLimit (`judge`). A Job being deleted is
    /// left to the garbage collector.
    fn step_job(&mut self, name: &str) {
        let job = self.jobs[name].clone();
        let finished = job["status"]["conditions"].as_array().is_some_and(|c| !c.is_empty());
        if finished || !job["metadata"]["deletionTimestamp"].is_null() {
            return;
        }
        let pods: Vec<&SimulatedPod> = self.pods.values().filter(|p| p.job == name).collect();
        let phase = |p: &SimulatedPod| p.object["status"]["phase"].as_str().unwrap_or("").to_string();
        let active: Vec<String> = pods
            .iter()
            .filter(|p| matches!(phase(p).as_str(), "Pending" | "Running"))
            .map(|p| p.object["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        let succeeded = pods.iter().filter(|p| phase(p) == "Succeeded").count();
        let failed: Vec<&Value> = pods.iter().filter(|p| phase(p) == "Failed").map(|p| &p.object).collect();
        let judgement = judge(&job, &failed);
        let parallelism = job["spec"]["parallelism"].as_u64().unwrap_or(1) as usize;
        let condition = match &judgement.failed {
            Some((reason, message)) => Some(("Failed", reason.clone(), message.clone())),
            None if succeeded > 0 && active.is_empty() => Some(("Complete", String::new(), String::new())),
            None => None,
        };
        let mut status = json!({"active": active.len(), "succeeded": succeeded, "failed": judgement.counted});
        if let Some((kind, reason, message)) = condition {
            status["conditions"] = json!([{"type": kind, "status": "True", "reason": reason, "message": message}]);
            for pod in &active {
                self.kill(pod);
            }
        } else if succeeded == 0 && active.len() < parallelism {
            for _ in active.len()..parallelism {
                self.create_pod(name, &job);
            }
        } else if active.len() > parallelism {
            // Newest first, as the Job controller prefers pods not yet ready.
            for pod in active.iter().rev().take(active.len() - parallelism) {
                self.remove_pod(pod);
            }
        }
        if job["status"] != status {
            let mut job = job;
            job["status"] = status;
            self.changed("MODIFIED", "jobs", &mut job);
            self.jobs.insert(name.to_string(), job);
        }
    }

    fn create_pod(&mut self, job_name: &str, job: &Value) {
        let name = format!("{job_name}-p{}", self.pods_created);
        let template = &job["spec"]["template"];
        let violations = restricted_violations(&template["spec"]);
        if !violations.is_empty() {
            // Admission refuses the pod; the Job controller records a
            // FailedCreate event and tries again.
            self.rejected_pods.insert(format!(
                "pods \"{name}\" is forbidden: violates PodSecurity \"restricted:latest\": {}",
                violations.join(", ")
            ));
            return;
        }
        let number = self.pods_created;
        self.pods_created += 1;
        let mut labels = template["metadata"]["labels"].clone();
        labels["job-name"] = json!(job_name);
        let mut object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels, "uid": format!("uid-{name}")},
            "spec": template["spec"].clone(),
            "status": {"phase": "Pending"},
        });
        self.changed("ADDED", "pods", &mut object);
        let log = self.logs.join(format!("{name}.log"));
        self.pods.insert(
            name,
            SimulatedPod { job: job_name.to_string(), number, created: Instant::now(), child: None, log, object },
        );
    }
}

fn container_status(image: &str, state: Value) -> Value {
    json!({"name": "worker", "image": image, "imageID": "", "ready": false, "restartCount": 0, "state": state})
}

fn event_line(event: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": event, "object": object})))
}

/// A helper for tests: waits for a condition, or fails after `seconds`.
pub fn wait_until(seconds: u64, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the Job controller makes of a Job's failed pods.
#[derive(Debug, PartialEq)]
pub struct Judgement {
    /// Failures counted against backoffLimit.
    pub counted: usize,
    /// The Job fails: (reason, message) of its Failed condition.
    pub failed: Option<(String, String)>,
}

/// The Job controller's reading of `failed` pods: each is judged by the
/// first podFailurePolicy rule that matches it (Ignore: not counted, and
/// the pod is replaced; FailJob: the Job fails; Count, or no rule: it
/// counts); more counted failures than backoffLimit fail the Job.
pub fn judge(job: &Value, failed: &[&Value]) -> Judgement {
    // The API server's default backoffLimit.
    let backoff_limit = job["spec"]["backoffLimit"].as_u64().unwrap_or(6) as usize;
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array().cloned().unwrap_or_default();
    let mut counted = 0;
    for pod in failed {
        let matched = rules.iter().enumerate().find_map(|(index, rule)| Some((index, rule, rule_matches(rule, pod)?)));
        match matched {
            Some((index, rule, why)) if rule["action"] == "FailJob" => {
                let message = format!("{why} matching FailJob rule at index {index}");
                return Judgement { counted, failed: Some(("PodFailurePolicy".into(), message)) };
            }
            Some((_, rule, _)) if rule["action"] == "Ignore" => {}
            _ => counted += 1,
        }
    }
    let failed = (counted > backoff_limit)
        .then(|| ("BackoffLimitExceeded".into(), "Job has reached the specified backoff limit".into()));
    Judgement { counted, failed }
}

/// Whether a podFailurePolicy rule matches a failed pod, and how (the Job
/// controller's words); onExitCodes looks only at containers that exited
/// non-zero, and only at `containerName` if it is set.
fn rule_matches(rule: &Value, pod: &Value) -> Option<String> {
    let pod_name = format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE),
        pod["metadata"]["name"].as_str().unwrap_or("")
    );
    let codes = &rule["onExitCodes"];
    if codes.is_object() {
        let values: Vec<i64> = codes["values"].as_array().into_iter().flatten().filter_map(Value::as_i64).collect();
        let wanted = |code: i64| match codes["operator"].as_str() {
            Some("In") => values.contains(&code),
            Some("NotIn") => !values.contains(&code),
            _ => false,
        };
        let containers = pod["status"]["containerStatuses"].as_array().into_iter().flatten();
        return containers
            .filter(|c| codes["containerName"].as_str().is_none_or(|name| c["name"] == name))
            .filter_map(|c| Some((c["name"].as_str()?, c["state"]["terminated"]["exitCode"].as_i64()?)))
            .find(|(_, code)| *code != 0 && wanted(*code))
            .map(|(container, code)| format!("Container {container} for pod {pod_name} failed with exit code {code}"));
    }
    let conditions = pod["status"]["conditions"].as_array().cloned().unwrap_or_default();
    rule["onPodConditions"].as_array().into_iter().flatten().find_map(|pattern| {
        let status = pattern["status"].as_str().unwrap_or("True");
        conditions
            .iter()
            .any(|c| c["type"] == pattern["type"] && c["status"] == status)
            .then(|| format!("Pod {pod_name} has condition {}", pattern["type"].as_str().unwrap_or("")))
    })
}

/// Why the "restricted" Pod Security Standard refuses a pod spec, in the
/// admission controller's words; empty if it admits it.
pub fn restricted_violations(spec: &Value) -> Vec<String> {
    let mut violations = Vec::new();
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|field| spec[*field].as_array().into_iter().flatten())
        .collect();
    let failing = |test: &dyn Fn(&Value) -> bool| -> Vec<String> {
        containers.iter().filter(|c| !test(&c["securityContext"])).map(|c| format!("{}", c["name"])).collect()
    };
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host] == true {
            violations.push(format!("host namespaces ({host}=true)"));
        }
    }
    let privileged = failing(&|sc| sc["privileged"] != true);
    if !privileged.is_empty() {
        violations.push(format!(
            "privileged (containers {} must not set securityContext.privileged=true)",
            privileged.join(", ")
        ));
    }
    let escalating = failing(&|sc| sc["allowPrivilegeEscalation"] == false);
    if !escalating.is_empty() {
        violations.push(format!(
            "allowPrivilegeEscalation != false (containers {} must set securityContext.allowPrivilegeEscalation=false)",
            escalating.join(", ")
        ));
    }
    let capable = failing(&|sc| {
        let caps = &sc["capabilities"];
        caps["drop"].as_array().is_some_and(|d| d.iter().any(|c| c == "ALL"))
            && caps["add"].as_array().into_iter().flatten().all(|c| c == "NET_BIND_SERVICE")
    });
    if !capable.is_empty() {
        violations.push(format!(
            "unrestricted capabilities (containers {} must set securityContext.capabilities.drop=[\"ALL\"])",
            capable.join(", ")
        ));
    }
    let pod_non_root = spec["securityContext"]["runAsNonRoot"] == true;
    let root = failing(&|sc| sc["runAsNonRoot"] == true || (pod_non_root && sc["runAsNonRoot"] != false));
    if !root.is_empty() {
        violations.push(format!(
            "runAsNonRoot != true (pod or containers {} must set securityContext.runAsNonRoot=true)",
            root.join(", ")
        ));
    }
    let uid_zero = spec["securityContext"]["runAsUser"] == 0 || !failing(&|sc| sc["runAsUser"] != 0).is_empty();
    if uid_zero {
        violations.push("runAsUser=0 (pod and containers must not set runAsUser=0)".into());
    }
    let allowed_profile = |profile: &Value| matches!(profile["type"].as_str(), Some("RuntimeDefault" | "Localhost"));
    let pod_profile = allowed_profile(&spec["securityContext"]["seccompProfile"]);
    let unconfined = failing(&|sc| {
        let profile = &sc["seccompProfile"];
        if profile.is_null() {
            pod_profile
        } else {
            allowed_profile(profile)
        }
    });
    if !unconfined.is_empty() {
        violations.push(format!(
            "seccompProfile (pod or containers {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
            unconfined.join(", ")
        ));
    }
    const VOLUME_KINDS: [&str; 8] =
        ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let kinds = volume.as_object().into_iter().flat_map(|v| v.keys()).filter(|k| *k != "name");
        if let Some(kind) = kinds.into_iter().find(|k| !VOLUME_KINDS.contains(&k.as_str())) {
            violations.push(format!("restricted volume types (volume {} uses {kind})", volume["name"]));
        }
    }
    violations
}
