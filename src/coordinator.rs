//! Walks a plan's DAG against a queue: a task is pushed once all its
//! inputs are done, a failure fails everything downstream of it (the other
//! runs go on), and the walk ends when every run has an outcome, on Ctrl-C,
//! or on `qsweep cancel`. The same walk drives the embedded queue and
//! Redis; only the `Queue` differs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::artifacts::Artifacts;
use crate::plan::{Plan, Task, TaskKey};
use crate::progress::{Progress, RunCounts, TaskOutcome};
use crate::queue::QueueError;
use crate::queue::{Event, Finished, Queue, Recorded};
use crate::store::{unix_now, FailureRecord, ResultsDir};

/// How a sweep run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    pub counts: RunCounts,
    /// Tasks whose artifacts were already complete.
    pub cached_tasks: usize,
    pub executed_tasks: usize,
    pub interrupted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Queued,
    Done,
    Failed,
}

pub async fn run<Q: Queue>(
    plan: &Plan,
    artifacts: Artifacts<'_>,
    queue: &mut Q,
    mut interrupt: impl std::future::Future<Output = ()> + Unpin,
) -> Result<RunSummary, QueueError> {
    let results = artifacts.results();
    let recorded = queue.recorded().await?;
    let mut state: HashMap<TaskKey, State> = HashMap::new();
    let mut cached_tasks = 0;
    // Tasks come after their inputs, so an input's state is known first:
    // an artifact counts as done only if its inputs are done too.
    for task in &plan.tasks {
        let inputs_done = task.inputs.iter().all(|i| state[&i.key] == State::Done);
        let current = if inputs_done && is_current(&artifacts, task).await? {
            cached_tasks += 1;
            State::Done
        } else {
            match recorded.get(&task.key) {
                Some(Recorded::Queued) => State::Queued,
                Some(Recorded::Failed) => State::Failed,
                None => State::Waiting,
            }
        };
        state.insert(task.key.clone(), current);
    }
    let labels = labels(plan);
    let progress = Progress::new(plan.tasks.len() - cached_tasks, queue.slots());
    if cached_tasks > 0 {
        progress.note(&format!("{cached_tasks} of {} tasks already complete; skipping them", plan.tasks.len()));
    }

    let mut executed_tasks = 0;
    let mut interrupted = false;
    let mut remade_inputs = std::collections::HashSet::new();
    loop {
        propagate_failures(plan, &mut state);
        let mut ready: Vec<_> = plan
            .tasks
            .iter()
            .filter(|t| state[&t.key] == State::Waiting && t.inputs.iter().all(|i| state[&i.key] == State::Done))
            .map(|t| Arc::new(t.clone()))
            .collect();
        // Queued nearest-result first, so workers report runs early.
        ready.sort_by_key(|t| t.stage.urgency());
        if !ready.is_empty() {
            let keys: Vec<TaskKey> = ready.iter().map(|t| t.key.clone()).collect();
            if let Err(e) = queue.push(ready).await {
                transient(&progress, e).await?;
                continue;
            }
            for key in keys {
                state.insert(key, State::Queued);
            }
        }
        progress.runs(run_counts(plan, &state));
        let waiting = state.values().filter(|s| **s == State::Waiting).count();
        let queued = state.values().filter(|s| **s == State::Queued).count();
        if let Err(e) = queue.work_left(waiting, queued).await {
            transient(&progress, e).await?;
            continue;
        }
        if waiting + queued == 0 {
            break;
        }
        match queue.cancelled().await {
            Ok(true) => {
                progress.note("cancelled with `qsweep cancel`");
                interrupted = true;
                break;
            }
            Ok(false) => {}
            Err(e) => {
                transient(&progress, e).await?;
                continue;
            }
        }
        let events = tokio::select! {
            events = queue.events() => events,
            _ = &mut interrupt => {
                progress.note("interrupted: stopping; run the same command again to resume");
                interrupted = true;
                queue.shutdown().await
            }
        };
        let events = match events {
            Ok(events) => events,
            Err(e) => {
                transient(&progress, e).await?;
                continue;
            }
        };
        for event in events {
            let label = |key: &TaskKey| labels.get(key).cloned().unwrap_or_else(|| key.short().to_string());
            match event {
                Event::Started { key, slot } => progress.started(slot, &label(&key)),
                Event::Progress { key, slot, text } => progress.task_progress(slot, &label(&key), &text),
                Event::Retrying { key, slot, attempt, error } => progress.retrying(slot, &label(&key), attempt, &error),
                Event::Workers { alive } => progress.workers(alive),
                Event::Note { message } => progress.note(&message),
                Event::Finished { key, slot, worker, outcome } => {
                    if state.get(&key) != Some(&State::Queued) {
                        continue; // a duplicate report of a task already settled
                    }
                    let label = if slot.is_some() { label(&key) } else { format!("{} on {worker}", label(&key)) };
                    match outcome {
                        Finished::Done { elapsed_s } => {
                            executed_tasks += 1;
                            let task = plan.task(&key).expect("events name the plan's tasks");
                            if !task.stage.writes_artifact() || is_current(&artifacts, task).await? {
                                state.insert(key, State::Done);
                                progress.finished(slot, &label, elapsed_s);
                            } else {
                                // Never count a result that is not there.
                                let error = format!(
                                    "{} reported {} done, but its artifact is missing, damaged or stale in {}",
                                    worker,
                                    task.stage,
                                    results.root().display()
                                );
                                record_failure(plan, results, &key, &error);
                                state.insert(key, State::Failed);
                                progress.failed(slot, &label, &error);
                            }
                        }
                        Finished::Failed { error } => {
                            executed_tasks += 1;
                            let task = plan.task(&key).expect("events name the plan's tasks");
                            let damaged = damaged_inputs(plan, &artifacts, task).await?;
                            // An input found damaged as the task read it was set
                            // aside: make it again, then this task (once).
                            if !damaged.is_empty() && remade_inputs.insert(key.clone()) {
                                progress.note(&format!("{label}: {error}; making it again"));
                                remake(plan, &mut state, damaged);
                                state.insert(key, State::Waiting);
                                continue;
                            }
                            record_failure(plan, results, &key, &error);
                            state.insert(key, State::Failed);
                            progress.failed(slot, &label, &error);
                        }
                        Finished::Cancelled => {
                            state.insert(key, State::Waiting);
                        }
                    }
                }
            }
        }
        if interrupted {
            break;
        }
    }
    progress.finish();
    queue.close().await;
    Ok(RunSummary { counts: run_counts(plan, &state), cached_tasks, executed_tasks, interrupted })
}

/// Whether `task`'s artifact is complete and current (a benchmark's no-op
/// task writes none and is never cached). An object store that cannot be
/// read is an error that ends the sweep, with what is recorded kept.
async fn is_current(artifacts: &Artifacts<'_>, task: &Task) -> Result<bool, QueueError> {
    if !task.stage.writes_artifact() {
        return Ok(false);
    }
    artifacts.current(task).await.map_err(|e| QueueError::Fatal(e.to_string()))
}

/// Puts `damaged` artifacts back to be made again, with every finished
/// task made from them: a remade artifact has a new manifest, so what was
/// made from the old one would be stale when the sweep ends.
fn remake(plan: &Plan, state: &mut HashMap<TaskKey, State>, damaged: Vec<TaskKey>) {
    let mut remade: std::collections::HashSet<TaskKey> = damaged.into_iter().collect();
    // Tasks come after their inputs, so one pass reaches every descendant.
    for task in &plan.tasks {
        let made_from_remade = task.inputs.iter().any(|i| remade.contains(&i.key));
        if remade.contains(&task.key) || (made_from_remade && state[&task.key] == State::Done) {
            state.insert(task.key.clone(), State::Waiting);
            remade.insert(task.key.clone());
        }
    }
}

/// The inputs of `task` whose artifacts are no longer current.
async fn damaged_inputs(plan: &Plan, artifacts: &Artifacts<'_>, task: &Task) -> Result<Vec<TaskKey>, QueueError> {
    let mut damaged = Vec::new();
    for input in task.inputs.iter().filter_map(|input| plan.task(&input.key)) {
        if !is_current(artifacts, input).await? {
            damaged.push(input.key.clone());
        }
    }
    Ok(damaged)
}

/// A queue error mid-sweep is most likely Redis restarting: say so and
/// retry, since the connection manager reconnects. A fatal one ends the
/// sweep; what is recorded stays recorded.
async fn transient(progress: &Progress, error: QueueError) -> Result<(), QueueError> {
    if !error.is_transient() {
        progress.finish();
        return Err(error);
    }
    progress.note(&format!("{error}; retrying"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Remote workers that could not reach the results directory report the
/// error only through the queue; keep it in the results either way.
fn record_failure(plan: &Plan, results: &ResultsDir, key: &TaskKey, error: &str) {
    if results.failure(key).is_none() {
        if let Some(task) = plan.task(key) {
            let record = FailureRecord {
                key: key.clone(),
                stage: task.stage,
                attempts: 1,
                error: error.to_string(),
                failed_unix: unix_now(),
                fatal: false,
            };
            let _ = results.record_failure(&record);
        }
    }
}

fn propagate_failures(plan: &Plan, state: &mut HashMap<TaskKey, State>) {
    // Tasks come after their inputs, so one pass reaches the whole subtree.
    for task in &plan.tasks {
        if state[&task.key] == State::Waiting && task.inputs.iter().any(|i| state[&i.key] == State::Failed) {
            state.insert(task.key.clone(), State::Failed);
        }
    }
}

/// "evaluate 1a2b3c4d5e6f (fp32)": the stage, its key, and who needs it.
fn labels(plan: &Plan) -> HashMap<TaskKey, String> {
    let mut users: HashMap<&TaskKey, Vec<&str>> = HashMap::new();
    for run in &plan.runs {
        for key in &run.tasks {
            users.entry(key).or_default().push(&run.run.id);
        }
    }
    plan.tasks
        .iter()
        .map(|task| {
            let runs = users.get(&task.key).cloned().unwrap_or_default();
            let who = match runs.len() {
                0 => String::new(),
                1 => runs[0].to_string(),
                n => format!("{} and {} more", runs[0], n - 1),
            };
            (task.key.clone(), format!("{} {} ({who})", task.stage, task.key.short()))
        })
        .collect()
}

fn run_counts(plan: &Plan, state: &HashMap<TaskKey, State>) -> RunCounts {
    RunCounts::tally(plan, |key| match state[key] {
        State::Done => TaskOutcome::Done,
        State::Failed => TaskOutcome::Failed,
        State::Waiting | State::Queued => TaskOutcome::Pending,
    })
}
