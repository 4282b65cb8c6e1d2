//! The embedded queue: `jobs` in-process workers, no server.
//!
//! Evaluation measures latency, so it runs alone: an evaluate task starts
//! only when nothing else runs and no other kind of task waits, and nothing
//! starts beside it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::{Event, Finished, Queue, Recorded};
use crate::plan::{StageKind, Task, TaskKey};
use crate::queue::QueueError;
use crate::store::ResultsDir;
use crate::sweep::Sweep;
use crate::worker::{self, Attempts, Outcome};

pub struct MemoryQueue {
    sweep: Arc<Sweep>,
    results: ResultsDir,
    policy: Attempts,
    jobs: usize,
    waiting: VecDeque<Arc<Task>>,
    running: JoinSet<(usize, TaskKey, Outcome)>,
    /// Which slot runs which kind of task.
    busy: HashMap<usize, StageKind>,
    stop: watch::Sender<bool>,
    /// Retries and progress from running tasks.
    updates: (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>),
}

/// Turns one slot's task's retries and progress into events.
struct SlotListener {
    key: TaskKey,
    slot: usize,
    updates: mpsc::UnboundedSender<Event>,
}

impl worker::Listener for SlotListener {
    fn retrying(&self, attempt: u32, error: &str) {
        let event = Event::Retrying { key: self.key.clone(), slot: Some(self.slot), attempt, error: error.to_string() };
        let _ = self.updates.send(event);
    }

    fn progress(&self, text: &str) {
        let _ = self.updates.send(Event::Progress { key: self.key.clone(), slot: self.slot, text: text.to_string() });
    }
}

impl MemoryQueue {
    pub fn new(sweep: Arc<Sweep>, results: ResultsDir, jobs: usize) -> Self {
        let policy = Attempts { retries: sweep.spec.retries, timeout: Duration::from_secs(sweep.spec.timeout) };
        Self {
            sweep,
            results,
            policy,
            jobs: jobs.max(1),
            waiting: VecDeque::new(),
            running: JoinSet::new(),
            busy: HashMap::new(),
            stop: watch::channel(false).0,
            updates: mpsc::unbounded_channel(),
        }
    }

    /// Starts what the slots and the evaluate-alone rule allow.
    fn start_ready(&mut self) -> Vec<Event> {
        let mut started = Vec::new();
        if self.busy.values().any(|&stage| stage == StageKind::Evaluate) {
            return started;
        }
        while self.busy.len() < self.jobs {
            let position = match self.waiting.iter().position(|t| t.stage != StageKind::Evaluate) {
                Some(work) => work,
                None if self.busy.is_empty() && !self.waiting.is_empty() => 0,
                None => break,
            };
            let task = self.waiting.remove(position).expect("the position is in range");
            let stage = task.stage;
            let slot = (0..self.jobs).find(|s| !self.busy.contains_key(s)).expect("a slot is free");
            self.busy.insert(slot, task.stage);
            started.push(Event::Started { key: task.key.clone(), slot });
            let (sweep, results, policy, shutdown) =
                (self.sweep.clone(), self.results.clone(), self.policy, self.stop.subscribe());
            let key = task.key.clone();
            let listener = Arc::new(SlotListener { key: key.clone(), slot, updates: self.updates.0.clone() });
            self.running.spawn(async move {
                let outcome = worker::run_task(task, sweep, results, policy, shutdown, listener).await;
                (slot, key, outcome)
            });
            if stage == StageKind::Evaluate {
                break;
            }
        }
        started
    }

    fn finished(&mut self, slot: usize, key: TaskKey, outcome: Outcome) -> Event {
        self.busy.remove(&slot);
        let outcome = match outcome {
            Outcome::Done(manifest) => Finished::Done { elapsed_s: manifest.elapsed_s },
            Outcome::Failed(record) => Finished::Failed { error: record.error },
            Outcome::Cancelled => Finished::Cancelled,
        };
        Event::Finished { key, slot: Some(slot), worker: format!("worker {}", slot + 1), outcome }
    }
}

impl Queue for MemoryQueue {
    fn slots(&self) -> usize {
        self.jobs
    }

    async fn recorded(&mut self) -> Result<HashMap<TaskKey, Recorded>, QueueError> {
        Ok(HashMap::new())
    }

    async fn push(&mut self, tasks: Vec<Arc<Task>>) -> Result<(), QueueError> {
        self.waiting.extend(tasks);
        Ok(())
    }

    async fn events(&mut self) -> Result<Vec<Event>, QueueError> {
        let mut events = self.start_ready();
        if !events.is_empty() {
            return Ok(events);
        }
        if self.running.is_empty() {
            return Ok(events);
        }
        tokio::select! {
            joined = self.running.join_next() => {
                if let Some(Ok((slot, key, outcome))) = joined {
                    events.push(self.finished(slot, key, outcome));
                }
            }
            Some(update) = self.updates.1.recv() => events.push(update),
        }
        Ok(events)
    }

    async fn cancelled(&mut self) -> Result<bool, QueueError> {
        Ok(false)
    }

    async fn shutdown(&mut self) -> Result<Vec<Event>, QueueError> {
        let _ = self.stop.send(true);
        self.waiting.clear();
        let mut events = Vec::new();
        while let Some(joined) = self.running.join_next().await {
            if let Ok((slot, key, outcome)) = joined {
                events.push(self.finished(slot, key, outcome));
            }
        }
        Ok(events)
    }
}
