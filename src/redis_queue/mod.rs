//! The Redis backend: the coordinator (`qsweep run --redis`) puts ready
//! tasks on a Redis stream, and any number of `qsweep worker` processes,
//! on any machines, take them, run them and record the outcome.
//!
//! Why Redis Streams with a consumer group: a delivered entry stays in the
//! group's pending list until its worker acknowledges it, so a worker that
//! dies never loses a task. Workers renew a lease on the task they run by
//! re-claiming its entry (XCLAIM resets its idle time) every third of the
//! lease; when a worker stops renewing, any other worker takes the entry
//! over with XAUTOCLAIM. (The plain-list pattern of the Kubernetes
//! work-queue tutorial strands such tasks forever.)
//!
//! What lives where:
//! - Redis holds the coordination state: the sweep, its plan, each task's
//!   state, outcomes, execution counts, worker heartbeats. A coordinator
//!   can therefore be killed and restarted and pick up where it was.
//! - The artifacts live in the results directory, which every worker must
//!   see at the same path (a shared filesystem). The model and the dataset
//!   are read from paths every worker shares too; a worker that cannot see
//!   them fails the task with a clear error. An artifact on disk that
//!   verifies is the durable record: even if Redis loses its last second of
//!   writes, nothing that finished is run again.
//! - Nothing read from Redis or the spec is ever run as a shell command.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::plan::TaskKey;
use crate::queue::QueueError;

pub mod connection;
pub mod consumer;
pub mod queue;

/// The names of every key, under a prefix so several sweeps and users can
/// share one Redis.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The consumer group all workers join.
pub const GROUP: &str = "workers";

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_string() }
    }

    /// The stream of ready tasks, shared by all sweeps under the prefix.
    pub fn queue(&self) -> String {
        format!("{}:queue", self.prefix)
    }

    /// Heartbeats: worker name -> unix milliseconds.
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// The sweep's definition: spec, results directory, cancelled flag.
    pub fn sweep(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}", self.prefix)
    }

    pub fn plan(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:plan", self.prefix)
    }

    /// Task key -> queued | done | failed.
    pub fn state(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:state", self.prefix)
    }

    /// Task key -> how many times a worker started executing it.
    pub fn executions(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:executions", self.prefix)
    }

    /// A stream of finished tasks that wakes the coordinator.
    pub fn events(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:events", self.prefix)
    }

    /// Task key -> attempts lost with their worker process (a pod killed
    /// for running out of memory), which count against the retries.
    pub fn lost_attempts(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:lost-attempts", self.prefix)
    }
}

/// A queue entry that a worker took and has not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTask {
    pub entry: String,
    pub sweep: String,
    pub key: TaskKey,
}

/// Records a task's outcome once, whoever runs it how many times: state is
/// keyed by task, and the entry is acknowledged and removed in the same
/// transaction, so a redelivered task still leaves one result.
pub async fn record_outcome(
    connection: &mut ConnectionManager,
    keys: &Keys,
    task: &PendingTask,
    worker: &str,
    outcome: Result<(), &str>,
) -> Result<(), QueueError> {
    let state = if outcome.is_ok() { "done" } else { "failed" };
    let error = outcome.err().unwrap_or_default();
    let mut pipe = redis::pipe();
    pipe.atomic()
        .hset(keys.state(&task.sweep), &task.key.0, state)
        .xadd(
            keys.events(&task.sweep),
            "*",
            &[("key", task.key.0.as_str()), ("state", state), ("worker", worker), ("error", error)],
        )
        .xack(keys.queue(), GROUP, &[&task.entry])
        .xdel(keys.queue(), &[&task.entry]);
    let _: () = pipe.query_async(connection).await?;
    Ok(())
}

/// Puts a task whose worker died back on the queue at once, instead of
/// after its lease runs out.
pub async fn requeue(connection: &mut ConnectionManager, keys: &Keys, task: &PendingTask) -> Result<(), QueueError> {
    let mut pipe = redis::pipe();
    pipe.atomic().xack(keys.queue(), GROUP, &[&task.entry]).xdel(keys.queue(), &[&task.entry]).xadd(
        keys.queue(),
        "*",
        &[("sweep", task.sweep.as_str()), ("key", task.key.0.as_str())],
    );
    let _: () = pipe.query_async(connection).await?;
    Ok(())
}

/// The entries held by the worker processes of one host (a pod's name is
/// its hostname, and worker consumers are named `{host}-{pid}-{slot}`).
pub async fn pending_on_host(
    connection: &mut ConnectionManager,
    keys: &Keys,
    host: &str,
) -> Result<Vec<PendingTask>, QueueError> {
    let pending: redis::streams::StreamPendingCountReply =
        connection.xpending_count(keys.queue(), GROUP, "-", "+", 10_000).await?;
    let mut tasks = Vec::new();
    for held in pending.ids.iter().filter(|p| p.consumer.strip_prefix(host).is_some_and(|rest| rest.starts_with('-'))) {
        let entries: redis::streams::StreamRangeReply = connection.xrange(keys.queue(), &held.id, &held.id).await?;
        for entry in entries.ids {
            let field = |name: &str| entry.get::<String>(name).unwrap_or_default();
            tasks.push(PendingTask { entry: entry.id.clone(), sweep: field("sweep"), key: TaskKey(field("key")) });
        }
    }
    Ok(tasks)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
