//! Talking to the Kubernetes API: connecting through a kubeconfig (or the
//! pod's service account), checking up front that qsweep may do all it
//! needs, managing a sweep's Jobs, and turning API errors into what to do.

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::KubeConfigOptions;
use kube::{Api, Client, Config};
use thiserror::Error;

use super::job::{selector, GENERATION_LABEL};

/// How long to wait for the API server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the coordinator does through the API, as (verb, API group,
/// resource, subresource): the same list as k8s/rbac.yaml's Role.
pub const REQUIRED_ACCESS: &[(&str, &str, &str, &str)] = &[
    ("create", "batch", "jobs", ""),
    ("get", "batch", "jobs", ""),
    ("list", "batch", "jobs", ""),
    ("watch", "batch", "jobs", ""),
    ("patch", "batch", "jobs", ""),
    ("delete", "batch", "jobs", ""),
    ("get", "", "pods", ""),
    ("list", "", "pods", ""),
    ("watch", "", "pods", ""),
    ("get", "", "pods", "log"),
];

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("no Kubernetes configuration: {message}\n  fix: point KUBECONFIG at a kubeconfig (or create ~/.kube/config), or run qsweep inside the cluster with a service account")]
    NoConfig { message: String },
    #[error("cannot reach the Kubernetes API at {server}: {message}\n  fix: check that the cluster runs and that the kubeconfig's current context (or --context) points at it")]
    Unreachable { server: String, message: String },
    #[error("the Kubernetes API at {server} rejected the credentials: {message}\n  fix: refresh the kubeconfig's credentials (log in to the cluster again)")]
    Unauthorized { server: String, message: String },
    #[error("not allowed in namespace {namespace}: {}\n  fix: `kubectl apply -k k8s/` creates the qsweep Role and RoleBinding, or ask an administrator to grant these verbs", .missing.join(", "))]
    Forbidden { namespace: String, missing: Vec<String> },
    #[error("namespace {namespace} does not exist\n  fix: create it (`kubectl apply -k k8s/` does) or name another with --namespace")]
    NamespaceMissing { namespace: String },
    #[error("Job {name} is gone from namespace {namespace}: something other than this coordinator deleted it\n  fix: run the sweep again; it resumes from what is recorded")]
    JobGone { name: String, namespace: String },
    #[error("the Kubernetes API refused to {action}: {message}")]
    Api { action: String, message: String },
}

/// A connection to one namespace of one cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub namespace: String,
    pub server: String,
}

impl Cluster {
    /// Connects with the kubeconfig's current context (or `context`), or,
    /// with no kubeconfig and no context named, the pod's service account.
    pub async fn connect(context: Option<&str>, namespace: &str) -> Result<Self, ClusterError> {
        let options = KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
        let mut config = match Config::from_kubeconfig(&options).await {
            Ok(config) => config,
            Err(kubeconfig_error) if context.is_none() => Config::incluster().map_err(|_| ClusterError::NoConfig {
                message: format!("{kubeconfig_error}, and this is not a pod in a cluster"),
            })?,
            Err(e) => return Err(ClusterError::NoConfig { message: e.to_string() }),
        };
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| ClusterError::NoConfig { message: e.to_string() })?;
        Ok(Self { client, namespace: namespace.to_string(), server })
    }

    /// A cluster reached through an already built client (tests).
    pub fn from_client(client: Client, namespace: &str) -> Self {
        Self { client, namespace: namespace.to_string(), server: "(client)".to_string() }
    }

    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Asks the API server (SelfSubjectAccessReview, which every
    /// authenticated user may) whether each call qsweep makes is allowed,
    /// so a missing permission is named before any Job exists.
    pub async fn check_access(&self) -> Result<(), ClusterError> {
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let mut missing = Vec::new();
        for (verb, group, resource, subresource) in REQUIRED_ACCESS {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(self.namespace.clone()),
                        verb: Some(verb.to_string()),
                        group: Some(group.to_string()),
                        resource: Some(resource.to_string()),
                        subresource: (!subresource.is_empty()).then(|| subresource.to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = reviews
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| self.error(e, "create", "selfsubjectaccessreviews"))?;
            if !answer.status.is_some_and(|s| s.allowed) {
                missing.push(access_name(verb, group, resource, subresource));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Forbidden { namespace: self.namespace.clone(), missing })
        }
    }

    /// The sweep's Jobs, oldest generation first.
    pub async fn sweep_jobs(&self, sweep: &str) -> Result<Vec<Job>, ClusterError> {
        let listed = self
            .jobs()
            .list(&ListParams::default().labels(&selector(sweep)))
            .await
            .map_err(|e| self.error(e, "list", "jobs.batch"))?;
        let mut jobs = listed.items;
        jobs.sort_by_key(generation);
        Ok(jobs)
    }

    /// Creates `job` as a dry run (`dryRun=All`): the API server checks
    /// the namespace, validates the Job and runs admission (a quota, a
    /// webhook), and stores nothing. So a run that would fail at its first
    /// write fails before any. The Job is sent under a generated name, so
    /// a Job already there under its own name cannot answer for it. Pod
    /// Security applies to pods, not Jobs: that is seen only when pods start.
    pub async fn check_job(&self, job: &Job) -> Result<(), ClusterError> {
        let mut unnamed = job.clone();
        unnamed.metadata.generate_name = unnamed.metadata.name.take().map(|name| format!("{name}-"));
        let dry_run = PostParams { dry_run: true, ..PostParams::default() };
        match self.jobs().create(&dry_run, &unnamed).await {
            Ok(_) => Ok(()),
            // The access review allowed the call: a refusal now is the
            // server's own (admission, validation), in its own words.
            Err(kube::Error::Api(status)) if matches!(status.code, 400 | 403 | 422) => {
                Err(ClusterError::Api { action: "create jobs.batch (dry run)".into(), message: status.message })
            }
            Err(e) => Err(self.error(e, "create", "jobs.batch")),
        }
    }

    pub async fn create_job(&self, job: &Job) -> Result<Job, ClusterError> {
        self.jobs().create(&PostParams::default(), job).await.map_err(|e| self.error(e, "create", "jobs.batch"))
    }

    /// The Job named `name`; `JobGone` once it was deleted (a 404 on a
    /// Job this coordinator created means exactly that: reads of one's own
    /// writes are consistent).
    pub async fn job(&self, name: &str) -> Result<Job, ClusterError> {
        self.jobs().get(name).await.map_err(|e| self.job_error(e, name, "get"))
    }

    pub async fn set_parallelism(&self, name: &str, parallelism: i32) -> Result<(), ClusterError> {
        let patch = serde_json::json!({"spec": {"parallelism": parallelism}});
        self.jobs()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|e| self.job_error(e, name, "patch"))
    }

    /// Deletes the sweep's Jobs and, because propagation is foreground,
    /// their pods before the Jobs themselves. Returns the names deleted.
    pub async fn delete_sweep_jobs(&self, sweep: &str) -> Result<Vec<String>, ClusterError> {
        let mut deleted = Vec::new();
        for job in self.sweep_jobs(sweep).await? {
            let name = job.metadata.name.unwrap_or_default();
            match self.jobs().delete(&name, &DeleteParams::foreground()).await {
                Ok(_) => deleted.push(name),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(self.error(e, "delete", "jobs.batch")),
            }
        }
        Ok(deleted)
    }

    /// An error from `verb` on the Job `name`, where a 404 means the Job is
    /// gone rather than a namespace that is missing.
    fn job_error(&self, error: kube::Error, name: &str, verb: &str) -> ClusterError {
        match error {
            kube::Error::Api(status) if status.code == 404 && !status.message.starts_with("namespaces ") => {
                ClusterError::JobGone { name: name.to_string(), namespace: self.namespace.clone() }
            }
            other => self.error(other, verb, "jobs.batch"),
        }
    }

    /// Turns an API error from `verb` on `resource` into what to do.
    pub fn error(&self, error: kube::Error, verb: &str, resource: &str) -> ClusterError {
        match error {
            kube::Error::Api(status) => match status.code {
                401 => ClusterError::Unauthorized { server: self.server.clone(), message: status.message },
                403 => ClusterError::Forbidden {
                    namespace: self.namespace.clone(),
                    missing: vec![format!("{verb} {resource}")],
                },
                404 if status.message.starts_with("namespaces ") => {
                    ClusterError::NamespaceMissing { namespace: self.namespace.clone() }
                }
                _ => ClusterError::Api { action: format!("{verb} {resource}"), message: status.message },
            },
            kube::Error::HyperError(_) | kube::Error::Service(_) => {
                ClusterError::Unreachable { server: self.server.clone(), message: error_chain(&error) }
            }
            other => ClusterError::Api { action: format!("{verb} {resource}"), message: error_chain(&other) },
        }
    }
}

/// "create jobs.batch", "get pods/log": how kubectl and RBAC name an access.
fn access_name(verb: &str, group: &str, resource: &str, subresource: &str) -> String {
    let resource = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
    if subresource.is_empty() {
        format!("{verb} {resource}")
    } else {
        format!("{verb} {resource}/{subresource}")
    }
}

/// An error with its causes, which is where hyper says what went wrong.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A Job's generation label (0 if it has none).
pub fn generation(job: &Job) -> u32 {
    job.metadata.labels.as_ref().and_then(|l| l.get(GENERATION_LABEL)).and_then(|g| g.parse().ok()).unwrap_or(0)
}

/// Whether a Job is being deleted: with foreground propagation it stays,
/// with a deletionTimestamp, until its pods are gone, and starts no more.
pub fn being_deleted(job: &Job) -> bool {
    job.metadata.deletion_timestamp.is_some()
}

/// Whether a Job has ended, and how: (complete, failed with this message).
pub fn job_ended(job: &Job) -> Option<Result<(), String>> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let holds = |kind: &str| conditions.iter().find(|c| c.type_ == kind && c.status == "True");
    if let Some(failed) = holds("Failed") {
        return Some(Err(format!(
            "{}: {}",
            failed.reason.as_deref().unwrap_or("Failed"),
            failed.message.as_deref().unwrap_or("")
        )));
    }
    holds("Complete").map(|_| Ok(()))
}

/// The exact calls qsweep makes, checked against a mocked HTTP service
/// (kube-rs's tower-test pattern).
#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use tower_test::mock::{self, Handle};

    type Calls = Handle<Request<Body>, Response<Body>>;

    fn mocked() -> (Cluster, Calls) {
        let (service, calls) = mock::pair::<Request<Body>, Response<Body>>();
        (Cluster::from_client(Client::new(service, "qsweep"), "qsweep"), calls)
    }

    /// Takes the next call, checks its method and URI, answers `reply`,
    /// and returns the call's JSON body.
    async fn expect(calls: &mut Calls, method: Method, uri: &str, reply: Value) -> Value {
        let (request, respond) = calls.next_request().await.expect("a call");
        assert_eq!((request.method(), request.uri().to_string().as_str()), (&method, uri));
        let content_type = request.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        let body = request.into_body().collect_bytes().await.unwrap();
        respond.send_response(Response::new(Body::from(serde_json::to_vec(&reply).unwrap())));
        let mut body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let Some(content_type) = content_type {
            body["content-type"] = json!(content_type);
        }
        body
    }

    fn job(name: &str, generation: u32) -> Value {
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {GENERATION_LABEL: generation.to_string()}}})
    }

    #[tokio::test]
    async fn cancel_lists_by_label_and_deletes_each_job_in_the_foreground() {
        let (cluster, mut calls) = mocked();
        let server = tokio::spawn(async move {
            let selector =
                "app.kubernetes.io%2Fcomponent%3Dworker%2Capp.kubernetes.io%2Fname%3Dqsweep%2Cqsweep.io%2Fsweep%3Ds";
            let list = json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": [job("qsweep-s-2", 2), job("qsweep-s-1", 1)]});
            expect(
                &mut calls,
                Method::GET,
                &format!("/apis/batch/v1/namespaces/qsweep/jobs?&labelSelector={selector}"),
                list,
            )
            .await;
            for name in ["qsweep-s-1", "qsweep-s-2"] {
                let body = expect(
                    &mut calls,
                    Method::DELETE,
                    &format!("/apis/batch/v1/namespaces/qsweep/jobs/{name}?"),
                    job(name, 1),
                )
                .await;
                assert_eq!(body["propagationPolicy"], "Foreground");
            }
        });
        assert_eq!(cluster.delete_sweep_jobs("s").await.unwrap(), ["qsweep-s-1", "qsweep-s-2"]);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn lowering_parallelism_is_one_merge_patch() {
        let (cluster, mut calls) = mocked();
        let server = tokio::spawn(async move {
            let body = expect(
                &mut calls,
                Method::PATCH,
                "/apis/batch/v1/namespaces/qsweep/jobs/qsweep-s-1?",
                job("qsweep-s-1", 1),
            )
            .await;
            assert_eq!(body, json!({"spec": {"parallelism": 3}, "content-type": "application/merge-patch+json"}));
        });
        cluster.set_parallelism("qsweep-s-1", 3).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn access_is_reviewed_for_every_call_and_the_missing_ones_named() {
        let (cluster, mut calls) = mocked();
        let server = tokio::spawn(async move {
            let mut asked = Vec::new();
            for _ in REQUIRED_ACCESS {
                let (request, respond) = calls.next_request().await.expect("a review");
                assert_eq!(request.uri().path(), "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews");
                let mut review: Value =
                    serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
                let attributes = review["spec"]["resourceAttributes"].clone();
                assert_eq!(attributes["namespace"], "qsweep");
                let denied = attributes["verb"] == "watch" && attributes["resource"] == "pods";
                review["status"] = json!({"allowed": !denied});
                asked.push(format!(
                    "{} {}",
                    attributes["verb"].as_str().unwrap(),
                    attributes["resource"].as_str().unwrap()
                ));
                respond.send_response(Response::new(Body::from(serde_json::to_vec(&review).unwrap())));
            }
            asked
        });
        let error = cluster.check_access().await.unwrap_err();
        assert!(matches!(&error, ClusterError::Forbidden { missing, .. } if missing == &["watch pods"]), "{error}");
        assert_eq!(server.await.unwrap().len(), REQUIRED_ACCESS.len());
    }

    #[test]
    fn accesses_are_named_as_rbac_names_them() {
        assert_eq!(access_name("create", "batch", "jobs", ""), "create jobs.batch");
        assert_eq!(access_name("get", "", "pods", "log"), "get pods/log");
    }
}
