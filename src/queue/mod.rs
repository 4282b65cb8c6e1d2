//! Where ready tasks wait for a worker, and where outcomes come back.
//!
//! The coordinator (`crate::coordinator`) walks the DAG the same way for
//! every backend; a `Queue` is what differs:
//! - `memory::MemoryQueue`, the embedded default: in-process workers on
//!   tokio's blocking pool, no server;
//! - `crate::redis_queue::RedisQueue`: a Redis stream that `qsweep worker`
//!   processes on any machine consume.

pub mod memory;

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;

use crate::plan::{Task, TaskKey};

/// Why a queue operation failed; the Redis variants carry what to do.
#[derive(Debug, Error)]
pub enum QueueError {
    /// The backend (Redis, a cluster's API) failed or cannot be reached;
    /// the coordinator waits and tries again. Its message says what to do.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    State(String),
    /// The workers' platform cannot run the sweep (an image that cannot be
    /// pulled, a Job that failed); retrying the same call cannot help.
    #[error("{0}")]
    Fatal(String),
}

impl QueueError {
    /// Whether the coordinator should wait and try again (Redis
    /// restarting) rather than stop the sweep.
    pub fn is_transient(&self) -> bool {
        !matches!(self, QueueError::Fatal(_))
    }
}

/// Something a queue reports back to the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A worker started a task (in-process workers only, which have a
    /// progress line each).
    Started {
        key: TaskKey,
        slot: usize,
    },
    /// A long task's own account of its progress (in-process workers).
    Progress {
        key: TaskKey,
        slot: usize,
        text: String,
    },
    Retrying {
        key: TaskKey,
        slot: Option<usize>,
        attempt: u32,
        error: String,
    },
    Finished {
        key: TaskKey,
        slot: Option<usize>,
        worker: String,
        outcome: Finished,
    },
    /// The number of live workers changed.
    Workers {
        alive: usize,
    },
    /// Something about the workers' platform the user should see (a pod
    /// that cannot be scheduled, an evicted pod).
    Note {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    Done {
        elapsed_s: f64,
    },
    Failed {
        error: String,
    },
    /// Stopped by shutdown; the task is still to do.
    Cancelled,
}

/// What a queue already knew about a task when the coordinator started
/// (a restarted coordinator finds its earlier work here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Queued,
    Failed,
}

// The trait is used with static dispatch inside this crate only, so the
// futures need no Send bound spelled out.
#[allow(async_fn_in_trait)]
pub trait Queue {
    /// In-process worker slots, each with a progress line (0 for remote workers).
    fn slots(&self) -> usize;

    async fn recorded(&mut self) -> Result<HashMap<TaskKey, Recorded>, QueueError>;

    /// Hands ready tasks to the workers.
    async fn push(&mut self, tasks: Vec<Arc<Task>>) -> Result<(), QueueError>;

    /// Waits a while for events; an empty list means nothing happened yet.
    async fn events(&mut self) -> Result<Vec<Event>, QueueError>;

    /// Whether the sweep was cancelled from outside (`qsweep cancel`).
    async fn cancelled(&mut self) -> Result<bool, QueueError>;

    /// Hears how much of the sweep is left after every step, so a backend
    /// can scale its workers to it. `waiting` tasks wait for inputs;
    /// `queued` ones are queued or running.
    async fn work_left(&mut self, _waiting: usize, _queued: usize) -> Result<(), QueueError> {
        Ok(())
    }

    /// Stops on Ctrl-C. In-process workers stop their stages and report
    /// them Cancelled; remote workers keep their tasks, which a restarted
    /// coordinator finds again.
    async fn shutdown(&mut self) -> Result<Vec<Event>, QueueError>;

    /// Ends this coordinator's hold on the sweep (Redis: gives up the
    /// coordinator lease, so the next one need not wait for it to expire).
    async fn close(&mut self) {}
}
