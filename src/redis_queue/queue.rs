//! The Redis side of a sweep: `RedisQueue` publishes the sweep and its
//! plan, puts ready tasks on the stream and turns workers' outcomes into
//! events for the coordinator; `status` and `cancel` work from any machine.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

use sha2::{Digest, Sha256};

use super::consumer::ensure_group;
use super::lease::{self, Lease};
use super::{now_ms, Keys, PendingTask};
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
    /// Digest of the spec, plan and artifact location this coordinator
    /// published: what every entry it queues carries.
    identity: String,
    /// This coordinator's hold on the sweep; None once released.
    lease: Option<Lease>,
    /// Tasks pushed and not yet finished, to re-queue any Redis lost.
    queued: HashSet<TaskKey>,
    last_event: String,
    last_requeue_check: Instant,
    workers_seen: Option<usize>,
    left_said: Option<usize>,
}

impl RedisQueue {
    /// Takes the sweep's coordinator lease (making the consumer group the
    /// workers read from, if it is new): the first step, so a second
    /// coordinator is refused before it writes anything.
    pub async fn claim(mut connection: ConnectionManager, keys: &Keys, sweep: &str) -> Result<Lease, QueueError> {
        ensure_group(&mut connection, keys).await?;
        Lease::acquire(connection, keys, sweep).await
    }

    /// With the sweep's lease from `claim`, publishes the sweep (its
    /// spec with absolute paths, its results directory, its plan, and the
    /// identity they make) for workers, and clears a previous cancel.
    ///
    /// State recorded under another identity (another spec, plan or
    /// results location) is dropped, so nothing of it is trusted. Under the
    /// same identity a restarted coordinator keeps what is queued, and
    /// failures are retried unless they were fatal.
    pub async fn publish(
        lease: Lease,
        mut connection: ConnectionManager,
        keys: Keys,
        sweep: &Sweep,
        plan: &Plan,
        results: &ResultsDir,
        artifacts: Option<&str>,
    ) -> Result<Self, QueueError> {
        // Lost since `claim` (the results directory took its time)? Then
        // another coordinator's published sweep must not be overwritten.
        lease.check()?;
        let spec =
            sweep.portable_spec().map_err(|e| QueueError::State(format!("cannot resolve the spec's paths: {e}")))?;
        let results_path = std::path::absolute(results.root()).map_err(|e| QueueError::State(e.to_string()))?;
        let results_path = results_path.display().to_string();
        let plan_json = serde_json::to_string(plan).expect("a plan serializes");
        let artifacts = artifacts.unwrap_or_default();
        let identity = identity(&[&spec, &plan_json, &results_path, artifacts]);

        let name = &plan.sweep;
        let previous: Option<String> = connection.hget(keys.sweep(name), "identity").await?;
        let mut reset = redis::pipe();
        reset.atomic();
        if previous.as_deref() == Some(identity.as_str()) {
            let recorded: HashMap<String, String> = connection.hgetall(keys.state(name)).await?;
            for (key, _) in recorded.iter().filter(|(_, state)| *state == "failed") {
                reset.hdel(keys.state(name), key).ignore();
                reset.hdel(keys.lost_attempts(name), key).ignore();
            }
        } else {
            for stale in [keys.state(name), keys.executions(name), keys.lost_attempts(name), keys.events(name)] {
                reset.del(stale).ignore();
            }
        }
        let _: () = reset
            .hset_multiple(
                keys.sweep(name),
                &[
                    ("spec", spec.as_str()),
                    ("results", &results_path),
                    ("artifacts", artifacts),
                    ("identity", &identity),
                    ("cancelled", "0"),
                    // Until the coordinator first counts, say everything is
                    // left, so no worker of the sweep leaves early.
                    ("left", &plan.tasks.len().to_string()),
                    ("cluster", ""),
                ],
            )
            .set(keys.plan(name), plan_json)
            .query_async(&mut connection)
            .await?;
        // Events before now are settled in the state hash already; reading
        // them again would replay old failures of tasks about to be retried.
        let newest: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
            .arg(keys.events(name))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await?;
        Ok(Self {
            connection,
            keys,
            sweep: plan.sweep.clone(),
            identity,
            lease: Some(lease),
            queued: HashSet::new(),
            last_event: newest.first().map_or_else(|| "0-0".to_string(), |(id, _)| id.clone()),
            last_requeue_check: Instant::now(),
            workers_seen: None,
            left_said: None,
        })
    }

    /// A queue entry for `key` under this sweep's identity.
    fn entry(&self, key: &TaskKey) -> PendingTask {
        PendingTask {
            entry: String::new(),
            sweep: self.sweep.clone(),
            identity: self.identity.clone(),
            key: key.clone(),
        }
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
            .filter(|(_, f)| f.get("sweep") == Some(&self.sweep) && f.get("identity") == Some(&self.identity))
            .filter_map(|(_, f)| f.get("key").map(String::as_str))
            .collect();
        let recorded: HashMap<String, String> = self.connection.hgetall(self.keys.state(&self.sweep)).await?;
        let settled = |key: &TaskKey| recorded.get(&key.0).is_some_and(|state| is_settled(state));
        let lost: Vec<TaskKey> =
            self.queued.iter().filter(|k| !present.contains(k.0.as_str()) && !settled(k)).cloned().collect();
        for key in lost {
            let _: () = self.connection.xadd(self.keys.queue(), "*", &self.entry(&key).fields()).await?;
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
                // Only fatal failures are left after `publish`.
                "failed" | "fatal" => Recorded::Failed,
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
            pipe.xadd(self.keys.queue(), "*", &self.entry(&task.key).fields()).ignore();
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
        if let Some(lease) = &self.lease {
            lease.check()?;
        }
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

    async fn close(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release().await;
        }
    }
}

/// Whether a recorded state is an outcome (not "queued").
fn is_settled(state: &str) -> bool {
    matches!(state, "done" | "failed" | "fatal")
}

/// The digest that names one publication of a sweep.
fn identity(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(&hasher.finalize()[..16])
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
    let coordinator = match lease::holder(&mut connection, keys, sweep).await? {
        Some(holder) => format!("coordinator: {holder}"),
        None => "coordinator: none (no `qsweep run` holds the sweep now)".to_string(),
    };
    let recorded_as = |key: &TaskKey| match recorded.get(&key.0).map(String::as_str) {
        Some("fatal") => "failed",
        Some(state) => state,
        None => "waiting",
    };
    let count = |wanted: &str| plan.tasks.iter().filter(|t| recorded_as(&t.key) == wanted).count();
    let runs = RunCounts::tally(&plan, |key| match recorded_as(key) {
        "done" => TaskOutcome::Done,
        "failed" => TaskOutcome::Failed,
        _ => TaskOutcome::Pending,
    });
    Ok(format!(
        "sweep {sweep}{}\n{coordinator}\nruns: {} done, {} failed, {} remaining\ntasks: {} done, {} failed, {} queued or running, {} waiting for inputs ({} executions)\nworkers alive: {}\n{}",
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

/// A worker process whose every heartbeat is older than this has gone:
/// a busy worker beats at least every third of its lease, an idle one
/// every few seconds.
pub const GONE_AFTER: Duration = Duration::from_secs(120);

/// The (host, PID) of worker processes whose heartbeats have all expired.
/// Consumer names are `{host}-{pid}-{slot}`.
pub async fn gone_workers(
    connection: &mut ConnectionManager,
    keys: &Keys,
) -> Result<HashSet<(String, u32)>, QueueError> {
    let beats: HashMap<String, u64> = connection.hgetall(keys.workers()).await?;
    let now = now_ms();
    let mut newest: HashMap<(String, u32), u64> = HashMap::new();
    for (name, beat) in beats {
        let mut parts = name.rsplitn(3, '-');
        let (Some(_slot), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let Ok(pid) = pid.parse() else { continue };
        let entry = newest.entry((host.to_string(), pid)).or_default();
        *entry = (*entry).max(beat);
    }
    Ok(newest
        .into_iter()
        .filter(|(_, beat)| now.saturating_sub(*beat) > GONE_AFTER.as_millis() as u64)
        .map(|(process, _)| process)
        .collect())
}

async fn alive_workers(connection: &mut ConnectionManager, keys: &Keys) -> Result<usize, QueueError> {
    let beats: HashMap<String, u64> = connection.hgetall(keys.workers()).await?;
    let now = now_ms();
    Ok(beats.values().filter(|&&beat| now.saturating_sub(beat) < ALIVE_WITHIN.as_millis() as u64).count())
}
