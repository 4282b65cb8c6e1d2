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
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
