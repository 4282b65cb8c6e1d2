//! The embedded queue: `jobs` in-process workers, no server.
//!
//! Evaluation measures latency, so it runs alone: nothing starts beside an
//! evaluate task. It also turns finished work into a result the user can
//! read, so a waiting evaluate goes first: no new task starts until the
//! running ones are done and it has run. Other tasks start nearest-result
//! first (`StageKind::urgency`), so PTQ runs are reported before QAT's
//! minutes-long stages run, and a QAT stage starts only once no shorter
//! work runs. With `--jobs` above 1 the price is slots idle while the
//! running tasks finish; with one slot there is none.

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
        while self.busy.len() < self.jobs {
            let waiting: Vec<StageKind> = self.waiting.iter().map(|t| t.stage).collect();
            let running: Vec<StageKind> = self.busy.values().copied().collect();
            let Some(position) = next_to_start(&waiting, &running) else {
                break;
            };
            let task = self.waiting.remove(position).expect("the position is in range");
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

/// Which waiting task starts next, given what runs (a slot is free): the
/// first of the most urgent, an evaluate only when nothing runs, nothing
/// beside an evaluate, and a long stage (training, QAT) only once no
/// shorter work runs, so that with several slots a build's evaluate is
/// not held up for minutes by a QAT stage started beside it.
fn next_to_start(waiting: &[StageKind], running: &[StageKind]) -> Option<usize> {
    let position = (0..waiting.len()).min_by_key(|&i| (waiting[i].urgency(), i))?;
    let long = |stage: &StageKind| stage.urgency() >= StageKind::Train.urgency();
    let evaluating = running.contains(&StageKind::Evaluate);
    let needs_idle = waiting[position] == StageKind::Evaluate;
    let held_back = long(&waiting[position]) && running.iter().any(|stage| !long(stage));
    (!evaluating && (!needs_idle || running.is_empty()) && !held_back).then_some(position)
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

#[cfg(test)]
mod tests {
    use super::next_to_start;
    use crate::plan::StageKind::{Build, Calibrate, Evaluate, Qat};

    #[test]
    fn builds_and_evaluates_go_before_qat_so_ptq_results_come_first() {
        // Calibration is done: two QAT stages were queued before two builds.
        assert_eq!(next_to_start(&[Qat, Qat, Build, Build], &[]), Some(2));
        // The build has finished: its evaluate runs before the next build.
        assert_eq!(next_to_start(&[Qat, Qat, Build, Evaluate], &[]), Some(3));
        assert_eq!(next_to_start(&[Qat, Calibrate], &[]), Some(1));
    }

    #[test]
    fn an_evaluate_runs_alone() {
        // It waits for the running build rather than share the CPU with it,
        // and nothing else starts meanwhile.
        assert_eq!(next_to_start(&[Evaluate, Qat], &[Build]), None);
        assert_eq!(next_to_start(&[Build, Qat], &[Evaluate]), None);
        // Without an evaluate waiting, free slots fill, but QAT waits for
        // a running build, whose evaluate would otherwise wait for the QAT.
        assert_eq!(next_to_start(&[Qat, Build], &[Qat]), Some(1));
        assert_eq!(next_to_start(&[Qat, Qat], &[Qat]), Some(0));
        assert_eq!(next_to_start(&[Qat], &[Build]), None);
        assert_eq!(next_to_start(&[], &[]), None);
    }
}
