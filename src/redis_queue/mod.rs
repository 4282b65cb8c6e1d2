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
//!
//! A sweep's identity is a digest of its spec, its plan and where its
//! artifacts go, not just its name: every queue entry carries the identity
//! it was queued under, workers reload the sweep when it changes, and an
//! outcome is recorded only under the identity it was run for. So the same
//! sweep rerun into another results directory, or with an edited spec,
//! never reuses state, settings or results of the earlier one.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::plan::TaskKey;
use crate::queue::QueueError;

pub mod connection;
pub mod consumer;
pub mod lease;
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

    /// The coordinator's lease on the sweep (`lease`).
    pub fn coordinator(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:coordinator", self.prefix)
    }

    /// Task key -> queued | done | failed | fatal (failed in a way that
    /// repeats until the spec changes).
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
    /// The sweep's identity when the task was queued.
    pub identity: String,
    pub key: TaskKey,
}

impl PendingTask {
    /// Reads a queue entry's fields.
    pub fn from_entry(entry: &redis::streams::StreamId) -> Self {
        let field = |name: &str| entry.get::<String>(name).unwrap_or_default();
        Self { entry: entry.id.clone(), sweep: field("sweep"), identity: field("identity"), key: TaskKey(field("key")) }
    }

    /// The fields of a queue entry for this task.
    pub fn fields(&self) -> [(&str, &str); 3] {
        [("sweep", self.sweep.as_str()), ("identity", self.identity.as_str()), ("key", self.key.0.as_str())]
    }
}

/// How a task ended, as Redis records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskResult<'a> {
    Done,
    /// Used up its retries; a rerun of the coordinator tries again.
    Failed(&'a str),
    /// Will fail the same way until the spec changes; a rerun of the same
    /// spec does not try again.
    Fatal(&'a str),
}

impl TaskResult<'_> {
    fn state(self) -> &'static str {
        match self {
            TaskResult::Done => "done",
            TaskResult::Failed(_) => "failed",
            TaskResult::Fatal(_) => "fatal",
        }
    }
}

/// Settles a task once, whoever runs it how many times: state is keyed by
/// task, and the entry is acknowledged and removed in the same script. The
/// outcome is recorded only if the sweep still has the identity the task
/// was queued under; a task of a superseded sweep is just acknowledged.
const RECORD_OUTCOME: &str = r#"
if redis.call('HGET', KEYS[1], 'identity') == ARGV[1] then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  redis.call('XADD', KEYS[3], '*', 'key', ARGV[2], 'state', ARGV[3], 'worker', ARGV[4], 'error', ARGV[5])
end
redis.call('XACK', KEYS[4], ARGV[6], ARGV[7])
redis.call('XDEL', KEYS[4], ARGV[7])
return 1
"#;

pub async fn record_outcome(
    connection: &mut ConnectionManager,
    keys: &Keys,
    task: &PendingTask,
    worker: &str,
    result: TaskResult<'_>,
) -> Result<(), QueueError> {
    let error = match result {
        TaskResult::Done => "",
        TaskResult::Failed(error) | TaskResult::Fatal(error) => error,
    };
    let _: i64 = redis::Script::new(RECORD_OUTCOME)
        .key(keys.sweep(&task.sweep))
        .key(keys.state(&task.sweep))
        .key(keys.events(&task.sweep))
        .key(keys.queue())
        .arg(&task.identity)
        .arg(&task.key.0)
        .arg(result.state())
        .arg(worker)
        .arg(error)
        .arg(GROUP)
        .arg(&task.entry)
        .invoke_async(connection)
        .await?;
    Ok(())
}

/// Puts a task back on the queue at once, instead of after its lease runs
/// out: its worker died, or is shutting down and hands it back.
pub async fn requeue(connection: &mut ConnectionManager, keys: &Keys, task: &PendingTask) -> Result<(), QueueError> {
    let mut pipe = redis::pipe();
    pipe.atomic().xack(keys.queue(), GROUP, &[&task.entry]).xdel(keys.queue(), &[&task.entry]).xadd(
        keys.queue(),
        "*",
        &task.fields(),
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
        tasks.extend(entries.ids.iter().map(PendingTask::from_entry));
    }
    Ok(tasks)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
