//! A stand-in Kubernetes API server for the control-loop tests: no real
//! cluster runs on the CI machines, so this speaks the REST paths qsweep
//! uses (Jobs, pods with list and watch, pod logs, access reviews) well
//! enough for kube's client and watcher, and plays the Job controller and
//! the kubelet: each pod of a created Job runs as a local process with the
//! pod's command, args and environment (the Secret's keys, the downward
//! API's pod name), so a sweep really passes coordinator -> API -> pods ->
//! Redis -> results.
//!
//! A `Scenario` injects the failures real clusters have: a pod the
//! scheduler cannot place for a while, an image that cannot be pulled, a
//! pod killed at its memory limit (exit 137, OOMKilled) or evicted while it
//! holds a task, and permissions the coordinator lacks.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
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
    /// Accesses the coordinator lacks, e.g. "delete jobs.batch".
    pub denied: Vec<String>,
}

pub const NAMESPACE: &str = "qsweep";
pub const SECRET: &str = "qsweep-redis";

pub struct StandInApi {
    pub port: u16,
    pub world: Arc<Mutex<World>>,
    runtime: Option<tokio::runtime::Runtime>,
}

pub struct World {
    resource_version: u64,
    jobs: BTreeMap<String, Value>,
    pods: BTreeMap<String, SimulatedPod>,
    history: Vec<(u64, &'static str, &'static str, Value)>,
    watchers: Vec<Watcher>,
    /// Every mutating call, "VERB path body", for the tests to inspect.
    pub calls: Vec<String>,
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
            pods: BTreeMap::new(),
            history: Vec::new(),
            watchers: Vec::new(),
            calls: Vec::new(),
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
}

impl Drop for StandInApi {
    fn drop(&mut self) {
        let mut world = self.world.lock().unwrap();
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
                    (&Method::POST, []) => world.create_job(body),
                    (&Method::GET, [name]) => world.jobs.get(*name).map_or_else(|| not_found(name), |j| ok(j.clone())),
                    (&Method::PATCH, [name]) => world.patch_job(name, body),
                    (&Method::DELETE, [name]) => world.delete_job(name),
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
        review["status"] = json!({"allowed": !self.scenario.denied.contains(&name)});
        ok(review)
    }

    fn list_or_watch(&mut self, kind: &'static str, query: &HashMap<String, String>) -> Response<Body> {
        let selector = parse_selector(query);
        let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        if !watching {
            let items: Vec<Value> = match kind {
                "jobs" => self.jobs.values().filter(|j| matches(j, &selector)).cloned().collect(),
                _ => self.pods.values().map(|p| &p.object).filter(|p| matches(p, &selector)).cloned().collect(),
            };
            return list(if kind == "jobs" { "JobList" } else { "PodList" }, items, self.resource_version);
        }
        let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let (sender, mut receiver) = mpsc::unbounded_channel::<Bytes>();
        for (version, event, of_kind, object) in &self.history {
            if *version > since && *of_kind == kind && matches(object, &selector) {
                let _ = sender.send(event_line(event, object));
            }
        }
        self.watchers.push(Watcher { kind, selector, sender });
        let stream = futures::stream::poll_fn(move |cx| {
            receiver.poll_recv(cx).map(|line| line.map(|l| Ok::<_, Infallible>(Frame::data(l))))
        });
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
        let line = event_line(event, object);
        self.watchers
            .retain(|w| w.kind != kind || !matches(object, &w.selector) || w.sender.send(line.clone()).is_ok());
    }

    fn create_job(&mut self, mut job: Value) -> Response<Body> {
        let name = job["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if self.jobs.contains_key(&name) {
            return status(409, "AlreadyExists", &format!("jobs.batch \"{name}\" already exists"));
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

    fn delete_job(&mut self, name: &str) -> Response<Body> {
        let Some(mut job) = self.jobs.remove(name) else { return not_found(name) };
        let pods: Vec<String> = self.pods.iter().filter(|(_, p)| p.job == name).map(|(n, _)| n.clone()).collect();
        for pod in pods {
            self.remove_pod(&pod);
        }
        self.changed("DELETED", "jobs", &mut job);
        ok(job)
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
            assert_eq!(source["secretRef"]["name"], SECRET, "the Job's Secret");
            process.env("REDIS_URL", &self.redis_url);
        }
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
    /// pods until one succeeds; disruptions are ignored, exit code 2 fails
    /// the Job, other failures count against backoffLimit.
    fn step_job(&mut self, name: &str) {
        let job = self.jobs[name].clone();
        if job["status"]["conditions"].as_array().is_some_and(|c| !c.is_empty()) {
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
        let disrupted = |p: &SimulatedPod| p.object["status"]["reason"] == "Evicted";
        let failed: Vec<&&SimulatedPod> = pods.iter().filter(|p| phase(p) == "Failed" && !disrupted(p)).collect();
        let config_error = failed
            .iter()
            .any(|p| p.object["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == json!(2));
        let parallelism = job["spec"]["parallelism"].as_u64().unwrap_or(1) as usize;
        let backoff_limit = job["spec"]["backoffLimit"].as_u64().unwrap_or(6) as usize;
        let condition = if config_error {
            Some((
                "Failed",
                "PodFailurePolicy",
                "Container worker for failed pod exited with code 2 matching FailJob rule",
            ))
        } else if failed.len() > backoff_limit {
            Some(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"))
        } else if succeeded > 0 && active.is_empty() {
            Some(("Complete", "", ""))
        } else {
            None
        };
        let mut status = json!({"active": active.len(), "succeeded": succeeded, "failed": failed.len()});
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
        let number = self.pods_created;
        self.pods_created += 1;
        let name = format!("{job_name}-p{number}");
        let template = &job["spec"]["template"];
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
