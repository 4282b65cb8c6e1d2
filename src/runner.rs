//! The local backend: executes a plan's DAG in this process on tokio, with
//! up to `jobs` stages at once and no server.
//!
//! The runner is the coordinator: it knows which tasks are done (their
//! artifacts verify), dispatches a task once all its inputs are done, and
//! when a task fails for good it fails every task downstream of it, so the
//! runs that do not depend on it go on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::plan::{Plan, StageKind, Task, TaskKey};
use crate::progress::{Progress, RunCounts, TaskOutcome};
use crate::store::ResultsDir;
use crate::sweep::Sweep;
use crate::worker::{self, Attempts, Outcome};

/// How a sweep run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    pub counts: RunCounts,
    /// Tasks whose artifacts were already complete.
    pub cached_tasks: usize,
    pub executed_tasks: usize,
    pub interrupted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
}

pub async fn run(
    sweep: Arc<Sweep>,
    plan: Arc<Plan>,
    results: ResultsDir,
    jobs: usize,
    mut interrupt: impl std::future::Future<Output = ()> + Unpin,
) -> RunSummary {
    let jobs = jobs.max(1);
    let mut state: HashMap<TaskKey, State> = HashMap::new();
    let mut cached_tasks = 0;
    for task in &plan.tasks {
        let done = results.verified(&task.key).is_some();
        cached_tasks += usize::from(done);
        state.insert(task.key.clone(), if done { State::Done } else { State::Waiting });
    }
    let dependents = dependents(&plan);
    let labels = labels(&plan);
    let progress = Progress::new(plan.tasks.len() - cached_tasks, jobs);
    if cached_tasks > 0 {
        progress.note(&format!("{cached_tasks} of {} tasks already complete; skipping them", plan.tasks.len()));
    }
    progress.runs(run_counts(&plan, &state));

    let policy = Attempts { retries: sweep.spec.retries, timeout: Duration::from_secs(sweep.spec.timeout) };
    let (stop, shutdown) = watch::channel(false);
    let progress = Arc::new(progress);
    let mut free_slots: Vec<usize> = (0..jobs).rev().collect();
    let mut in_flight = JoinSet::new();
    let mut executed_tasks = 0;
    let mut interrupted = false;

    loop {
        if !interrupted {
            for task in next_tasks(&plan, &state, free_slots.len(), in_flight.len()) {
                let slot = free_slots.pop().expect("next_tasks respects the free slots");
                state.insert(task.key.clone(), State::Running);
                let label = labels[&task.key].clone();
                progress.started(slot, &label);
                let task = Arc::new(task.clone());
                let (sweep, results, shutdown, progress) =
                    (sweep.clone(), results.clone(), shutdown.clone(), progress.clone());
                in_flight.spawn(async move {
                    let retry_label = label.clone();
                    let retry_progress = progress.clone();
                    let outcome =
                        worker::run_task(task.clone(), sweep, results, policy, shutdown, move |attempt, error| {
                            retry_progress.retrying(slot, &retry_label, attempt, error)
                        })
                        .await;
                    (slot, task.key.clone(), label, outcome)
                });
            }
        }
        if in_flight.is_empty() {
            break;
        }
        tokio::select! {
            joined = in_flight.join_next() => {
                let Some(Ok((slot, key, label, outcome))) = joined else { continue };
                free_slots.push(slot);
                match outcome {
                    Outcome::Done(manifest) => {
                        executed_tasks += 1;
                        progress.finished(slot, &label, manifest.elapsed_s);
                        state.insert(key, State::Done);
                    }
                    Outcome::Failed(record) => {
                        executed_tasks += 1;
                        progress.failed(slot, &label, &record.error);
                        fail_downstream(&key, &dependents, &mut state);
                    }
                    Outcome::Cancelled => {
                        state.insert(key, State::Waiting);
                    }
                }
                progress.runs(run_counts(&plan, &state));
            }
            _ = &mut interrupt, if !interrupted => {
                interrupted = true;
                progress.note("interrupted: stopping the running stages; run the same command again to resume");
                let _ = stop.send(true);
            }
        }
    }
    progress.finish();
    RunSummary { counts: run_counts(&plan, &state), cached_tasks, executed_tasks, interrupted }
}

/// The tasks to start now. Evaluation measures latency, so it runs alone:
/// it starts only when nothing else runs and nothing else is ready, and
/// nothing starts beside it.
fn next_tasks<'p>(plan: &'p Plan, state: &HashMap<TaskKey, State>, free_slots: usize, running: usize) -> Vec<&'p Task> {
    let measuring = plan.tasks.iter().any(|t| t.stage == StageKind::Evaluate && state[&t.key] == State::Running);
    if measuring {
        return Vec::new();
    }
    let ready: Vec<&Task> = plan
        .tasks
        .iter()
        .filter(|t| state[&t.key] == State::Waiting && t.inputs.iter().all(|i| state[&i.key] == State::Done))
        .collect();
    let (measurements, work): (Vec<&Task>, Vec<&Task>) =
        ready.into_iter().partition(|t| t.stage == StageKind::Evaluate);
    if !work.is_empty() {
        return work.into_iter().take(free_slots).collect();
    }
    if running == 0 {
        return measurements.into_iter().take(free_slots.min(1)).collect();
    }
    Vec::new()
}

/// For each task, the tasks that take it as an input.
fn dependents(plan: &Plan) -> HashMap<TaskKey, Vec<TaskKey>> {
    let mut map: HashMap<TaskKey, Vec<TaskKey>> = HashMap::new();
    for task in &plan.tasks {
        for input in &task.inputs {
            map.entry(input.key.clone()).or_default().push(task.key.clone());
        }
    }
    map
}

fn fail_downstream(key: &TaskKey, dependents: &HashMap<TaskKey, Vec<TaskKey>>, state: &mut HashMap<TaskKey, State>) {
    let mut stack = vec![key.clone()];
    let mut seen = HashSet::new();
    while let Some(key) = stack.pop() {
        if !seen.insert(key.clone()) {
            continue;
        }
        state.insert(key.clone(), State::Failed);
        stack.extend(dependents.get(&key).into_iter().flatten().cloned());
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
        State::Waiting | State::Running => TaskOutcome::Pending,
    })
}
