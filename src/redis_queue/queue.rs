//! The Redis side of a sweep: `RedisQueue` publishes the sweep and its
//! plan, puts ready tasks on the stream and turns workers' outcomes into
//! events for the coordinator; `status` and `cancel` work from any machine.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

use super::consumer::ensure_group;
use super::{now_ms, Keys};
use crate::plan::{Plan, Task, TaskKey};
use crate::progress::{RunCounts, TaskOutcome};
use crate::queue::QueueError;
use crate::queue::{Event, Finished, Queue, Recorded};
use crate::store::ResultsDir;
use crate::sweep::Sweep;

/// How often queued tasks are checked against the stream, in case Redis
/// lost an entry (AOF everysec can drop the last second on a crash).
const REQUEUE_CHECK: Duration = Duration::from_secs(3);
/// A worker is alive if it beat this recently.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(10);

pub struct RedisQueue {
    connection: ConnectionManager,
    keys: Keys,
    sweep: String,
    /// Tasks pushed and not yet finished, to re-queue any Redis lost.
    queued: HashSet<TaskKey>,
    last_event: String,
    last_requeue_check: Instant,
    workers_seen: Option<usize>,
    left_said: Option<usize>,
}

impl RedisQueue {
    /// Publishes the sweep (its spec with absolute paths, its results
    /// directory, its plan) for workers, and clears a previous cancel.
    pub async fn publish(
        mut connection: ConnectionManager,
        keys: Keys,
        sweep: &Sweep,
        plan: &Plan,
        results: &ResultsDir,
        artifacts: Option<&str>,
    ) -> Result<Self, QueueError> {
        ensure_group(&mut connection, &keys).await?;
        let spec =
            sweep.portable_spec().map_err(|e| QueueError::State(format!("cannot resolve the spec's paths: {e}")))?;
        let results_path = std::path::absolute(results.root()).map_err(|e| QueueError::State(e.to_string()))?;
        let plan_json = serde_json::to_string(plan).expect("a plan serializes");
        let _: () = redis::pipe()
            .atomic()
            .hset_multiple(
                keys.sweep(&plan.sweep),
                &[
                    ("spec", spec.as_str()),
                    ("results", &results_path.display().to_string()),
                    ("artifacts", artifacts.unwrap_or_default()),
                    ("cancelled", "0"),
                    // Until the coordinator first counts, say everything is
                    // left, so no worker of the sweep leaves early.
                    ("left", &plan.tasks.len().to_string()),
                    ("cluster", ""),
                ],
            )
            .set(keys.plan(&plan.sweep), plan_json)
            .query_async(&mut connection)
            .await?;
        Ok(Self {
            connection,
            keys,
            sweep: plan.sweep.clone(),
            queued: HashSet::new(),
            last_event: "0-0".to_string(),
            last_requeue_check: Instant::now(),
            workers_seen: None,
            left_said: None,
        })
    }

    /// Another handle on the same Redis connection.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Re-queues tasks that Redis says are queued but that no stream entry
    /// carries any more: the entry was lost in a Redis crash. A task still
    /// in the stream (pending or not) is left alone.
    async fn requeue_lost(&mut self) -> Result<(), QueueError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let entries: Vec<(String, HashMap<String, String>)> =
            redis::cmd("XRANGE").arg(self.keys.queue()).arg("-").arg("+").query_async(&mut self.connection).await?;
        let present: HashSet<&str> = entries
            .iter()
            .filter(|(_, f)| f.get("sweep") == Some(&self.sweep))
            .filter_map(|(_, f)| f.get("key").map(String::as_str))
            .collect();
        let recorded: HashMap<String, String> = self.connection.hgetall(self.keys.state(&self.sweep)).await?;
        let settled = |key: &TaskKey| matches!(recorded.get(&key.0).map(String::as_str), Some("done" | "failed"));
        let lost: Vec<TaskKey> =
            self.queued.iter().filter(|k| !present.contains(k.0.as_str()) && !settled(k)).cloned().collect();
        for key in lost {
            let _: () = self
                .connection
                .xadd(self.keys.queue(), "*", &[("sweep", self.sweep.as_str()), ("key", key.0.as_str())])
                .await?;
        }
        Ok(())
    }
}

impl Queue for RedisQueue {
    fn slots(&self) -> usize {
        0
    }

    async fn recorded(&mut self) -> Result<HashMap<TaskKey, Recorded>, QueueError> {
        let stored: HashMap<String, String> = self.connection.hgetall(self.keys.state(&self.sweep)).await?;
        let mut recorded = HashMap::new();
        for (key, state) in stored {
            // "done" is trusted only from an artifact that verifies, which
            // the coordinator checks itself; without one the task reruns.
            let state = match state.as_str() {
                "queued" => Recorded::Queued,
                "failed" => Recorded::Failed,
                _ => continue,
            };
            if state == Recorded::Queued {
                self.queued.insert(TaskKey(key.clone()));
            }
            recorded.insert(TaskKey(key), state);
        }
        Ok(recorded)
    }

    async fn push(&mut self, tasks: Vec<Arc<Task>>) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for task in &tasks {
            pipe.hset(self.keys.state(&self.sweep), &task.key.0, "queued").ignore();
            pipe.xadd(self.keys.queue(), "*", &[("sweep", self.sweep.as_str()), ("key", task.key.0.as_str())]).ignore();
        }
        let _: () = pipe.query_async(&mut self.connection).await?;
        self.queued.extend(tasks.iter().map(|t| t.key.clone()));
        Ok(())
    }

    async fn events(&mut self) -> Result<Vec<Event>, QueueError> {
        let mut events = Vec::new();
        let alive = alive_workers(&mut self.connection, &self.keys).await?;
        if self.workers_seen != Some(alive) {
            self.workers_seen = Some(alive);
            events.push(Event::Workers { alive });
        }
        if self.last_requeue_check.elapsed() > REQUEUE_CHECK {
            self.requeue_lost().await?;
            self.last_requeue_check = Instant::now();
        }
        let options = StreamReadOptions::default().count(256).block(1000);
        let read: Option<StreamReadReply> = self
            .connection
            .xread_options(&[self.keys.events(&self.sweep)], &[self.last_event.as_str()], &options)
            .await?;
        for entry in read.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            self.last_event = entry.id.clone();
            let field = |name: &str| entry.get::<String>(name).unwrap_or_default();
            let key = TaskKey(field("key"));
            self.queued.remove(&key);
            let outcome = if field("state") == "done" {
                Finished::Done { elapsed_s: 0.0 }
            } else {
                Finished::Failed { error: field("error") }
            };
            events.push(Event::Finished { key, slot: None, worker: field("worker"), outcome });
        }
        Ok(events)
    }

    async fn cancelled(&mut self) -> Result<bool, QueueError> {
        let flag: Option<String> = self.connection.hget(self.keys.sweep(&self.sweep), "cancelled").await?;
        Ok(flag.as_deref() == Some("1"))
    }

    /// Tells the workers (`--sweep NAME --exit-when-idle`) whether to stay.
    async fn work_left(&mut self, waiting: usize, queued: usize) -> Result<(), QueueError> {
        let left = waiting + queued;
        if self.left_said != Some(left) {
            let _: () = self.connection.hset(self.keys.sweep(&self.sweep), "left", left).await?;
            self.left_said = Some(left);
        }
        Ok(())
    }

    /// Remote workers keep their tasks; a restarted coordinator finds them.
    async fn shutdown(&mut self) -> Result<Vec<Event>, QueueError> {
        Ok(Vec::new())
    }
}

/// A sweep's progress as `qsweep status` prints it.
pub async fn status(url: &str, keys: &Keys, sweep: &str) -> Result<String, QueueError> {
    let mut connection = super::connection::connect(url).await?;
    let plan_json: Option<String> = connection.get(keys.plan(sweep)).await?;
    let Some(plan_json) = plan_json else {
        return Err(QueueError::State(format!(
            "no sweep named {sweep} under prefix {:?}\n  fix: check the name (the spec's `name`) and --prefix",
            keys.queue().trim_end_matches(":queue")
        )));
    };
    let mut plan: Plan =
        serde_json::from_str(&plan_json).map_err(|e| QueueError::State(format!("the stored plan is damaged: {e}")))?;
    plan.reindex();
    let recorded: HashMap<String, String> = connection.hgetall(keys.state(sweep)).await?;
    let executions: HashMap<String, u64> = connection.hgetall(keys.executions(sweep)).await?;
    let cancelled: Option<String> = connection.hget(keys.sweep(sweep), "cancelled").await?;
    let cluster: Option<String> = connection.hget(keys.sweep(sweep), "cluster").await?;
    let recorded_as = |key: &TaskKey| recorded.get(&key.0).map(String::as_str).unwrap_or("waiting");
    let count = |wanted: &str| plan.tasks.iter().filter(|t| recorded_as(&t.key) == wanted).count();
    let runs = RunCounts::tally(&plan, |key| match recorded_as(key) {
        "done" => TaskOutcome::Done,
        "failed" => TaskOutcome::Failed,
        _ => TaskOutcome::Pending,
    });
    Ok(format!(
        "sweep {sweep}{}\nruns: {} done, {} failed, {} remaining\ntasks: {} done, {} failed, {} queued or running, {} waiting for inputs ({} executions)\nworkers alive: {}\n{}",
        if cancelled.as_deref() == Some("1") { " (cancelled)" } else { "" },
        runs.done,
        runs.failed,
        runs.remaining,
        count("done"),
        count("failed"),
        count("queued"),
        count("waiting"),
        executions.values().sum::<u64>(),
        alive_workers(&mut connection, keys).await?,
        cluster.filter(|c| !c.is_empty()).map(|c| format!("cluster: {c}\n")).unwrap_or_default(),
    ))
}

/// Marks a sweep cancelled; its coordinator stops at its next look and
/// workers drop its queued tasks instead of running them.
pub async fn cancel(url: &str, keys: &Keys, sweep: &str) -> Result<(), QueueError> {
    let mut connection = super::connection::connect(url).await?;
    let exists: bool = connection.exists(keys.plan(sweep)).await?;
    if !exists {
        return Err(QueueError::State(format!("no sweep named {sweep} to cancel\n  fix: check the name and --prefix")));
    }
    let _: () = connection.hset(keys.sweep(sweep), "cancelled", "1").await?;
    Ok(())
}

async fn alive_workers(connection: &mut ConnectionManager, keys: &Keys) -> Result<usize, QueueError> {
    let beats: HashMap<String, u64> = connection.hgetall(keys.workers()).await?;
    let now = now_ms();
    Ok(beats.values().filter(|&&beat| now.saturating_sub(beat) < ALIVE_WITHIN.as_millis() as u64).count())
}
