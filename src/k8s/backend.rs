//! `qsweep run --backend k8s`: the sweep's Redis queue, plus a Job of
//! worker pods that the coordinator creates, watches and scales.
//!
//! `KubernetesQueue` wraps `RedisQueue`: tasks and outcomes travel through
//! Redis exactly as with hand-started workers; what this adds is the pods'
//! side. It watches them and reacts to what the coordinator loop cannot
//! see in Redis:
//! - a pod the scheduler cannot place: the scheduler's message goes to the
//!   progress display and `qsweep status` (never a silent hang);
//! - an image that cannot be pulled: the sweep fails at once, naming it;
//! - a container the kubelet cannot set up (its Secret or ConfigMap is
//!   missing): the sweep fails within seconds, naming what is missing and
//!   how to create it;
//! - a pod killed for memory: its task's attempt counts as "out of memory"
//!   and the task is queued again at once, until the spec's retries are
//!   spent;
//! - an evicted, preempted or deleted pod: its task is queued again, not
//!   counted;
//! - a Job that failed (a configuration error in every pod): the sweep
//!   fails with the pod's last log lines.
//!
//! Pods leave by themselves once the sweep has no work left for them; the
//! coordinator lowers the Job's parallelism as the work runs out, so no
//! new pod is scheduled for nothing. A restarted coordinator finds the
//! sweep's running Job by its labels and adopts it, unless it is being
//! deleted; a Job deleted under the coordinator is followed by the next
//! generation if tasks are still queued.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::runtime::watcher;
use kube::Api;
use redis::AsyncCommands;
use tokio::sync::mpsc;

use super::cluster::{being_deleted, generation, job_ended, Cluster, ClusterError};
use super::job::{parallelism_for, selector, worker_job, JobOptions};
use super::pods::{scheduled, trouble, PodTrouble};
use crate::plan::Task;
use crate::queue::{Event, Queue, QueueError, Recorded};
use crate::redis_queue::queue::RedisQueue;
use crate::redis_queue::{pending_on_host, record_outcome, requeue, PendingTask, TaskResult};
use crate::spec::Resources;

/// How often the Job itself is read (the pods are watched).
const JOB_CHECK: Duration = Duration::from_secs(2);
/// How long a container the kubelet cannot set up may stay so before the
/// sweep fails: the kubelet retries, so a Secret created a moment after
/// the Job is still found, but a missing one never appears by itself.
const CONTAINER_CONFIG_GRACE: Duration = Duration::from_secs(5);

/// Settings of the pods' side of a sweep.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub job: JobOptions,
    pub resources: Resources,
    /// Retries of a task, from the spec; out-of-memory kills count.
    pub retries: u32,
    /// How long a pod may stay unschedulable before the user is told.
    pub unschedulable_after: Duration,
}

impl From<ClusterError> for QueueError {
    fn from(error: ClusterError) -> Self {
        match error {
            // A watch or read that failed once may well work next time.
            ClusterError::Unreachable { .. } | ClusterError::Api { .. } => QueueError::State(error.to_string()),
            fatal => QueueError::Fatal(fatal.to_string()),
        }
    }
}

pub struct KubernetesQueue {
    inner: RedisQueue,
    cluster: Cluster,
    options: ClusterOptions,
    sweep: String,
    job: String,
    generation: u32,
    parallelism: i32,
    pods: mpsc::UnboundedReceiver<watcher::Event<Pod>>,
    watch: tokio::task::JoinHandle<()>,
    /// Pods not yet placed, since when, and whether the user was told.
    unscheduled: HashMap<String, (Instant, String, bool)>,
    /// Pods whose container the kubelet cannot set up: since when, and
    /// the kubelet's reason and message.
    unstartable: HashMap<String, (Instant, String, String)>,
    /// Pods whose end (OOM, eviction, failure) was handled already.
    handled: HashSet<String>,
    /// The sweep's pods as the watch last showed them, and those a relist
    /// in progress has shown: after a 410 Gone the watcher lists again
    /// instead of reporting deletions, so a pod missing from the new list
    /// was deleted in the gap.
    known_pods: HashSet<String>,
    relisted: HashSet<String>,
    /// Failed pods' names, newest last, for their logs if the Job fails.
    failed_pods: Vec<String>,
    last_job_check: Instant,
    queued: usize,
    notes: Vec<Event>,
}

impl KubernetesQueue {
    /// Adopts the sweep's running Job (a restarted coordinator) or creates
    /// one, and starts watching its pods.
    pub async fn start(
        inner: RedisQueue,
        cluster: Cluster,
        sweep: &str,
        pending: usize,
        options: ClusterOptions,
    ) -> Result<Self, QueueError> {
        let jobs = cluster.sweep_jobs(sweep).await?;
        let mut notes = Vec::new();
        // A Job being deleted starts no more pods and is gone soon: the
        // sweep needs a new one.
        let running = jobs.iter().rev().find(|job| job_ended(job).is_none() && !being_deleted(job));
        for job in jobs.iter().filter(|job| being_deleted(job)) {
            let name = job.metadata.name.as_deref().unwrap_or_default();
            notes.push(Event::Note { message: format!("Job {name} is being deleted; it is not adopted") });
        }
        let (job, generation, parallelism) = match running {
            Some(job) => {
                let name = job.metadata.name.clone().unwrap_or_default();
                notes.push(Event::Note {
                    message: format!("adopting Job {name}, which an earlier coordinator started"),
                });
                let parallelism = job.spec.as_ref().and_then(|s| s.parallelism).unwrap_or(1);
                (name, generation(job), parallelism)
            }
            None => {
                let next = jobs.last().map_or(1, |job| generation(job) + 1);
                let created = create(&cluster, sweep, pending, &options, next).await?;
                notes
                    .push(Event::Note { message: format!("created Job {created} in namespace {}", cluster.namespace) });
                (created, next, parallelism_for(pending, &options.resources))
            }
        };
        let (sender, pods) = mpsc::unbounded_channel();
        let watch = tokio::spawn(watch_pods(
            Api::namespaced(cluster.client.clone(), &cluster.namespace),
            selector(sweep),
            sender,
        ));
        Ok(Self {
            inner,
            cluster,
            options,
            sweep: sweep.to_string(),
            job,
            generation,
            parallelism,
            pods,
            watch,
            unscheduled: HashMap::new(),
            unstartable: HashMap::new(),
            handled: HashSet::new(),
            known_pods: HashSet::new(),
            relisted: HashSet::new(),
            failed_pods: Vec::new(),
            last_job_check: Instant::now(),
            queued: pending,
            notes,
        })
    }

    /// Reacts to one pod's latest state.
    async fn pod_changed(&mut self, pod: &Pod) -> Result<(), QueueError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        if scheduled(pod) {
            self.placed(&name).await?;
        }
        let trouble = trouble(pod);
        if !matches!(trouble, Some(PodTrouble::ContainerConfig { .. })) {
            self.unstartable.remove(&name);
        }
        let Some(trouble) = trouble else { return Ok(()) };
        match trouble {
            PodTrouble::Unschedulable { message } => {
                let entry = self.unscheduled.entry(name).or_insert_with(|| (Instant::now(), String::new(), false));
                if entry.1 != message {
                    (entry.1, entry.2) = (message, false);
                }
            }
            PodTrouble::ImagePullRetrying { image, message } => {
                self.note(format!("pod {name} is retrying the pull of image {image}: {message}"));
            }
            PodTrouble::ContainerConfig { reason, message } => {
                let since = self.unstartable.get(&name).map_or_else(Instant::now, |(since, ..)| *since);
                self.unstartable.insert(name, (since, reason, message));
            }
            PodTrouble::ImagePull { image, message } => {
                let deleted = self.cluster.delete_sweep_jobs(&self.sweep).await?;
                return Err(QueueError::Fatal(format!(
                    "pod {name} cannot pull image {image}: {message}\n  \
                     the sweep stops (deleted Job {}); results recorded so far are kept\n  \
                     fix: check the image name and tag (--image), that it was pushed, and the spec's resources.image_pull_secrets",
                    deleted.join(", ")
                )));
            }
            PodTrouble::OutOfMemory if self.handled.insert(name.clone()) => {
                self.failed_pods.push(name.clone());
                self.requeue_tasks_of(&name, Some("out of memory")).await?;
            }
            PodTrouble::Disrupted { reason } if self.handled.insert(name.clone()) => {
                self.note(format!(
                    "pod {name} was disrupted ({reason}); its task is queued again, not counted as an attempt"
                ));
                self.requeue_tasks_of(&name, None).await?;
            }
            PodTrouble::Failed { exit_code, message } if self.handled.insert(name.clone()) => {
                self.failed_pods.push(name.clone());
                self.note(format!("pod {name} exited with code {exit_code}: {message}"));
            }
            _ => {}
        }
        Ok(())
    }

    /// A pod got a node: forget its wait, and clear the message if no other
    /// pod is still waiting.
    async fn placed(&mut self, name: &str) -> Result<(), QueueError> {
        if let Some((_, _, told)) = self.unscheduled.remove(name) {
            if told {
                self.note(format!("pod {name} was scheduled"));
            }
            if !self.unscheduled.values().any(|(_, _, told)| *told) {
                self.say_in_status("").await?;
            }
        }
        Ok(())
    }

    /// Ends the sweep once a pod's container could not be set up for
    /// longer than the grace: every pod of the Job would wait the same way.
    async fn fail_unstartable(&mut self) -> Result<(), QueueError> {
        let Some((pod, (_, reason, message))) =
            self.unstartable.iter().find(|(_, (since, ..))| since.elapsed() >= CONTAINER_CONFIG_GRACE)
        else {
            return Ok(());
        };
        let (pod, reason, message) = (pod.clone(), reason.clone(), message.clone());
        let fix = container_config_fix(&message, &self.cluster.namespace, &pod);
        let deleted = self.cluster.delete_sweep_jobs(&self.sweep).await?;
        Err(QueueError::Fatal(format!(
            "pod {pod} cannot start its container ({reason}): {message}\n  \
             the sweep stops (deleted Job {}); results recorded so far are kept\n  \
             fix: {fix}",
            deleted.join(", ")
        )))
    }

    /// Tells the user about pods unschedulable for longer than the threshold.
    async fn report_unschedulable(&mut self) -> Result<(), QueueError> {
        let threshold = self.options.unschedulable_after;
        let mut late = Vec::new();
        for (pod, (since, message, told)) in &mut self.unscheduled {
            if !*told && since.elapsed() >= threshold {
                *told = true;
                late.push(format!("pod {pod} unschedulable for {}s: {message}", since.elapsed().as_secs()));
            }
        }
        for line in late {
            self.say_in_status(&line).await?;
            self.note(line);
        }
        Ok(())
    }

    /// The tasks a dead pod's workers held go back on the queue now. An
    /// out-of-memory kill counts as an attempt; once the retries are spent
    /// the task fails with that reason. Returns how many tasks it held.
    async fn requeue_tasks_of(&mut self, pod: &str, counted_as: Option<&str>) -> Result<usize, QueueError> {
        let mut connection = self.inner.connection();
        let keys = self.inner.keys().clone();
        let held: Vec<PendingTask> =
            pending_on_host(&mut connection, &keys, pod).await?.into_iter().filter(|t| t.sweep == self.sweep).collect();
        let count = held.len();
        for task in held {
            let Some(reason) = counted_as else {
                requeue(&mut connection, &keys, &task).await?;
                continue;
            };
            let attempt: u32 = connection.hincr(keys.lost_attempts(&self.sweep), &task.key.0, 1).await?;
            if attempt > self.options.retries {
                let error = format!(
                    "{reason}: pod {pod} was killed at its memory limit ({}) on each of {attempt} attempt(s)\n  \
                     fix: raise resources.memory in the spec",
                    self.options.resources.memory.as_deref().unwrap_or("none set")
                );
                record_outcome(&mut connection, &keys, &task, pod, TaskResult::Failed(&error)).await?;
            } else {
                requeue(&mut connection, &keys, &task).await?;
                self.notes.push(retrying(&task, attempt, format!("{reason} (pod {pod} was OOMKilled)")));
            }
        }
        Ok(count)
    }

    /// A pod is gone (its Job deleted, scaled down, or `kubectl delete`):
    /// a worker that was killed before it handed its tasks back still holds
    /// them, and nothing else would free them until their lease ran out.
    async fn pod_deleted(&mut self, name: &str) -> Result<(), QueueError> {
        self.placed(name).await?;
        self.unstartable.remove(name);
        if self.handled.insert(name.to_string()) && self.requeue_tasks_of(name, None).await? > 0 {
            self.note(format!("pod {name} was deleted while it held a task; it is queued again, not counted"));
        }
        Ok(())
    }

    /// Reads the Job: a failed one ends the sweep; one whose pods all left,
    /// or that was deleted, while tasks are still queued is followed by a
    /// new one.
    async fn check_job(&mut self) -> Result<(), QueueError> {
        self.last_job_check = Instant::now();
        let job = match self.cluster.job(&self.job).await {
            Ok(job) if !being_deleted(&job) => job,
            // Someone deleted it (kubectl, a TTL, a cancel from another
            // shell): its pods are gone or going, and with them the only
            // workers; their tasks come back as the pods' deletions arrive.
            Ok(_) | Err(ClusterError::JobGone { .. }) => {
                if self.queued > 0 {
                    self.next_generation("was deleted").await?;
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match job_ended(&job) {
            Some(Err(reason)) => {
                let logs = self.last_failed_pod_logs().await;
                return Err(QueueError::Fatal(format!(
                    "Job {} failed ({reason}); results recorded so far are kept{logs}\n  \
                     fix: read the pod's log above; an exit code 2 is a configuration error every pod would repeat",
                    self.job
                )));
            }
            Some(Ok(())) if self.queued > 0 => self.next_generation("has no pods left").await?,
            None if all_pods_left(&job) && self.queued > 0 => self.next_generation("has no pods left").await?,
            _ => {}
        }
        Ok(())
    }

    /// Starts the next generation of the Job because the current one
    /// `happened` (has no pods left, was deleted) with tasks still queued.
    async fn next_generation(&mut self, happened: &str) -> Result<(), QueueError> {
        self.generation += 1;
        let created = create(&self.cluster, &self.sweep, self.queued, &self.options, self.generation).await?;
        self.note(format!(
            "Job {} {happened} with {} task(s) still queued; created Job {created}",
            self.job, self.queued
        ));
        self.job = created;
        self.parallelism = parallelism_for(self.queued, &self.options.resources);
        Ok(())
    }

    async fn last_failed_pod_logs(&self) -> String {
        let Some(pod) = self.failed_pods.last() else { return String::new() };
        let pods: Api<Pod> = Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
        let params = LogParams { tail_lines: Some(20), ..Default::default() };
        match pods.logs(pod, &params).await {
            Ok(text) => format!("\n  last lines of pod {pod}:\n    {}", text.trim_end().replace('\n', "\n    ")),
            Err(e) => {
                format!("\n  (the log of pod {pod} cannot be read: {})", self.cluster.error(e, "get", "pods/log"))
            }
        }
    }

    /// A line for `qsweep status`, from any machine.
    async fn say_in_status(&mut self, line: &str) -> Result<(), QueueError> {
        let keys = self.inner.keys().clone();
        let _: () = self.inner.connection().hset(keys.sweep(&self.sweep), "cluster", line).await?;
        Ok(())
    }

    fn note(&mut self, message: String) {
        self.notes.push(Event::Note { message });
    }
}

impl Drop for KubernetesQueue {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl Queue for KubernetesQueue {
    fn slots(&self) -> usize {
        0
    }

    async fn recorded(&mut self) -> Result<HashMap<crate::plan::TaskKey, Recorded>, QueueError> {
        self.inner.recorded().await
    }

    async fn push(&mut self, tasks: Vec<Arc<Task>>) -> Result<(), QueueError> {
        self.inner.push(tasks).await
    }

    async fn events(&mut self) -> Result<Vec<Event>, QueueError> {
        let mut events = self.inner.events().await?;
        while let Ok(change) = self.pods.try_recv() {
            match change {
                watcher::Event::Apply(pod) => {
                    self.known_pods.insert(pod.metadata.name.clone().unwrap_or_default());
                    self.pod_changed(&pod).await?;
                }
                watcher::Event::InitApply(pod) => {
                    self.relisted.insert(pod.metadata.name.clone().unwrap_or_default());
                    self.pod_changed(&pod).await?;
                }
                watcher::Event::Delete(pod) => {
                    let name = pod.metadata.name.unwrap_or_default();
                    self.known_pods.remove(&name);
                    self.pod_deleted(&name).await?;
                }
                watcher::Event::Init => self.relisted.clear(),
                watcher::Event::InitDone => {
                    let listed = std::mem::take(&mut self.relisted);
                    let gone: Vec<String> = self.known_pods.difference(&listed).cloned().collect();
                    self.known_pods = listed;
                    for name in gone {
                        self.pod_deleted(&name).await?;
                    }
                }
            }
        }
        self.report_unschedulable().await?;
        self.fail_unstartable().await?;
        if self.last_job_check.elapsed() >= JOB_CHECK {
            self.check_job().await?;
        }
        events.append(&mut self.notes);
        Ok(events)
    }

    async fn cancelled(&mut self) -> Result<bool, QueueError> {
        let cancelled = self.inner.cancelled().await?;
        if cancelled {
            let deleted = self.cluster.delete_sweep_jobs(&self.sweep).await?;
            if !deleted.is_empty() {
                tracing::info!("deleted Job(s) {}", deleted.join(", "));
            }
        }
        Ok(cancelled)
    }

    /// Lowers the Job's parallelism as the work runs out, so pods that
    /// would find nothing are neither started nor kept pending.
    async fn work_left(&mut self, waiting: usize, queued: usize) -> Result<(), QueueError> {
        self.inner.work_left(waiting, queued).await?;
        self.queued = queued;
        let wanted = parallelism_for(waiting + queued, &self.options.resources);
        if wanted < self.parallelism {
            match self.cluster.set_parallelism(&self.job, wanted).await {
                // The next look at the Job starts another if work is left.
                Ok(()) | Err(ClusterError::JobGone { .. }) => self.parallelism = wanted,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The Job keeps running, and its pods their tasks: a restarted
    /// coordinator adopts it.
    async fn shutdown(&mut self) -> Result<Vec<Event>, QueueError> {
        Ok(vec![Event::Note {
            message: format!("Job {} keeps running; `qsweep cancel {}` stops it", self.job, self.sweep),
        }])
    }

    async fn close(&mut self) {
        self.inner.close().await;
    }
}

async fn create(
    cluster: &Cluster,
    sweep: &str,
    pending: usize,
    options: &ClusterOptions,
    generation: u32,
) -> Result<String, QueueError> {
    let job = worker_job(sweep, Some(&options.resources), pending, &options.job, generation)
        .map_err(|e| QueueError::Fatal(e.to_string()))?;
    let created = cluster.create_job(&job).await?;
    Ok(created.metadata.name.unwrap_or_default())
}

/// What to do about a container the kubelet cannot set up, from its
/// message (`secret "NAME" not found`, `configmap "NAME" not found`).
fn container_config_fix(message: &str, namespace: &str, pod: &str) -> String {
    let missing = |kind: &str| {
        let rest = message.split(&format!("{kind} \"")).nth(1)?;
        let (name, after) = rest.split_once('"')?;
        after.trim_start().starts_with("not found").then_some(name)
    };
    if let Some(secret) = missing("secret") {
        format!(
            "create the Secret: kubectl -n {namespace} create secret generic {secret} \
             --from-literal=REDIS_URL=redis://:PASSWORD@HOST:6379 (k8s/secret.example.yaml is a template), \
             or name an existing one with --secret NAME"
        )
    } else if let Some(config_map) = missing("configmap") {
        format!("create ConfigMap {config_map} in namespace {namespace}, or drop the reference to it")
    } else {
        format!("`kubectl -n {namespace} describe pod {pod}` shows what the kubelet could not set up")
    }
}

/// A Job with pods that all ended, at least one well: the Job controller
/// starts no more pods for it (the work-queue pattern).
fn all_pods_left(job: &Job) -> bool {
    let status = job.status.as_ref();
    let count = |n: Option<i32>| n.unwrap_or(0);
    count(status.and_then(|s| s.active)) == 0 && count(status.and_then(|s| s.succeeded)) > 0
}

fn retrying(task: &PendingTask, attempt: u32, error: String) -> Event {
    Event::Retrying { key: task.key.clone(), slot: None, attempt, error }
}

/// Streams the sweep's pods to the coordinator; the watcher re-lists and
/// resumes by itself after a dropped connection.
async fn watch_pods(pods: Api<Pod>, selector: String, sender: mpsc::UnboundedSender<watcher::Event<Pod>>) {
    let stream = watcher(pods, watcher::Config::default().labels(&selector));
    let mut stream = std::pin::pin!(stream);
    while let Some(change) = stream.next().await {
        match change {
            Ok(change) => {
                if sender.send(change).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("watching the worker pods: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_secret_or_config_map_is_named_with_the_command_that_creates_it() {
        let secret = container_config_fix(r#"secret "qsweep-redis" not found"#, "ns", "p");
        assert!(secret.starts_with("create the Secret: kubectl -n ns create secret generic qsweep-redis "), "{secret}");
        assert!(secret.contains("--secret NAME"), "{secret}");
        let config_map = container_config_fix(r#"configmap "settings" not found"#, "ns", "p");
        assert_eq!(config_map, "create ConfigMap settings in namespace ns, or drop the reference to it");
        let other = container_config_fix("failed to create containerd task", "ns", "p");
        assert_eq!(other, "`kubectl -n ns describe pod p` shows what the kubelet could not set up");
    }
}
