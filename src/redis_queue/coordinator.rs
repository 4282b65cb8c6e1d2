//! The coordinator of a Redis sweep: publishes the sweep and its plan,
//! releases each task once its inputs are done, follows the workers'
//! outcomes, and ends when every run has an outcome (or on Ctrl-C or
//! `qsweep cancel`). Its state lives in Redis, so a restarted coordinator
//! carries on without recomputing anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

use super::connection::QueueError;
use super::consumer::ensure_group;
use super::{now_ms, Keys};
use crate::plan::{Plan, TaskKey};
use crate::progress::{Progress, RunCounts, TaskOutcome};
use crate::runner::RunSummary;
use crate::store::{unix_now, FailureRecord, ResultsDir};
use crate::sweep::Sweep;

/// How often queued tasks are checked against the stream, in case Redis
/// lost an entry (AOF everysec can drop the last second on a crash).
const REQUEUE_CHECK: Duration = Duration::from_secs(3);
/// A worker is alive if it beat this recently.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Queued,
    Done,
    Failed,
}

pub async fn run(
    mut connection: ConnectionManager,
    keys: Keys,
    sweep: Arc<Sweep>,
    plan: Arc<Plan>,
    results: ResultsDir,
    mut interrupt: impl std::future::Future<Output = ()> + Unpin,
) -> Result<RunSummary, QueueError> {
    let name = plan.sweep.clone();
    ensure_group(&mut connection, &keys).await?;
    let spec = sweep.portable_spec().map_err(|e| QueueError::State(format!("cannot resolve the spec's paths: {e}")))?;
    let results_path = std::path::absolute(results.root()).map_err(|e| QueueError::State(e.to_string()))?;
    let plan_json = serde_json::to_string(plan.as_ref()).expect("a plan serializes");
    let _: () = redis::pipe()
        .atomic()
        .hset_multiple(
            keys.sweep(&name),
            &[("spec", spec.as_str()), ("results", &results_path.display().to_string()), ("cancelled", "0")],
        )
        .set(keys.plan(&name), plan_json)
        .query_async(&mut connection)
        .await?;

    let mut state: HashMap<TaskKey, State> = plan.tasks.iter().map(|t| (t.key.clone(), State::Waiting)).collect();
    let mut cached_tasks = 0;
    let stored: HashMap<String, String> = connection.hgetall(keys.state(&name)).await?;
    for task in &plan.tasks {
        let on_disk = results.verified(&task.key).is_some();
        let recorded = stored.get(&task.key.0).map(String::as_str);
        let current = match recorded {
            _ if on_disk => State::Done,
            Some("queued") => State::Queued,
            Some("failed") => State::Failed,
            // "done" without a verifying artifact means the artifact was
            // lost or damaged: run it again.
            _ => State::Waiting,
        };
        cached_tasks += usize::from(on_disk);
        state.insert(task.key.clone(), current);
    }
    let progress = Progress::new(plan.tasks.len() - cached_tasks, 0);
    if cached_tasks > 0 {
        progress.note(&format!("{cached_tasks} of {} tasks already complete; skipping them", plan.tasks.len()));
    }

    let mut last_event = "0-0".to_string();
    let mut last_requeue_check = Instant::now();
    let mut executed_tasks = 0;
    let mut interrupted = false;
    let mut workers_seen = usize::MAX;
    loop {
        propagate_failures(&plan, &mut state);
        release_ready(&mut connection, &keys, &plan, &mut state).await?;
        progress.runs(run_counts(&plan, &state));
        if !state.values().any(|s| matches!(s, State::Waiting | State::Queued)) {
            break;
        }
        let alive = alive_workers(&mut connection, &keys).await?;
        if alive != workers_seen {
            progress.note(&format!("{alive} worker(s) alive"));
            workers_seen = alive;
        }
        let cancelled: Option<String> = connection.hget(keys.sweep(&name), "cancelled").await?;
        if cancelled.as_deref() == Some("1") {
            progress.note("cancelled with `qsweep cancel`");
            interrupted = true;
            break;
        }
        if last_requeue_check.elapsed() > REQUEUE_CHECK {
            requeue_lost(&mut connection, &keys, &name, &plan, &state).await?;
            last_requeue_check = Instant::now();
        }
        let options = StreamReadOptions::default().count(256).block(1000);
        let (streams, ids) = ([keys.events(&name)], [last_event.clone()]);
        let read = tokio::select! {
            read = connection.xread_options::<_, _, Option<StreamReadReply>>(&streams, &ids, &options) => read,
            _ = &mut interrupt => {
                progress.note("interrupted: workers keep their current tasks; run the same command again to resume");
                interrupted = true;
                break;
            }
        };
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                progress.note(&format!("Redis: {e}; retrying"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for event in read.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            last_event = event.id.clone();
            let key = TaskKey(event.get::<String>("key").unwrap_or_default());
            let outcome = event.get::<String>("state").unwrap_or_default();
            let worker = event.get::<String>("worker").unwrap_or_default();
            let Some(task) = plan.task(&key) else { continue };
            if state.get(&key) != Some(&State::Queued) {
                continue;
            }
            let label = format!("{} {}", task.stage, key.short());
            executed_tasks += 1;
            if outcome == "done" {
                state.insert(key, State::Done);
                progress.note(&format!("done   {label} on {worker}"));
            } else {
                let error = event.get::<String>("error").unwrap_or_default();
                if results.failure(&key).is_none() {
                    let record = FailureRecord {
                        key: key.clone(),
                        stage: task.stage,
                        attempts: 1,
                        error: error.clone(),
                        failed_unix: unix_now(),
                    };
                    let _ = results.record_failure(&record);
                }
                state.insert(key, State::Failed);
                progress.failed(0, &label, &error);
            }
        }
    }
    progress.finish();
    Ok(RunSummary { counts: run_counts(&plan, &state), cached_tasks, executed_tasks, interrupted })
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
    let state: HashMap<TaskKey, State> = plan
        .tasks
        .iter()
        .map(|t| {
            let s = match recorded.get(&t.key.0).map(String::as_str) {
                Some("done") => State::Done,
                Some("failed") => State::Failed,
                Some("queued") => State::Queued,
                _ => State::Waiting,
            };
            (t.key.clone(), s)
        })
        .collect();
    let count = |wanted: State| state.values().filter(|s| **s == wanted).count();
    let runs = run_counts(&plan, &state);
    Ok(format!(
        "sweep {sweep}{}\nruns: {} done, {} failed, {} remaining\ntasks: {} done, {} failed, {} queued or running, {} waiting for inputs ({} executions)\nworkers alive: {}\n",
        if cancelled.as_deref() == Some("1") { " (cancelled)" } else { "" },
        runs.done,
        runs.failed,
        runs.remaining,
        count(State::Done),
        count(State::Failed),
        count(State::Queued),
        count(State::Waiting),
        executions.values().sum::<u64>(),
        alive_workers(&mut connection, keys).await?,
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

/// Queues every waiting task whose inputs are all done.
async fn release_ready(
    connection: &mut ConnectionManager,
    keys: &Keys,
    plan: &Plan,
    state: &mut HashMap<TaskKey, State>,
) -> Result<(), QueueError> {
    let ready: Vec<TaskKey> = plan
        .tasks
        .iter()
        .filter(|t| state[&t.key] == State::Waiting && t.inputs.iter().all(|i| state[&i.key] == State::Done))
        .map(|t| t.key.clone())
        .collect();
    if ready.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    for key in &ready {
        pipe.hset(keys.state(&plan.sweep), &key.0, "queued").ignore();
        pipe.xadd(keys.queue(), "*", &[("sweep", plan.sweep.as_str()), ("key", key.0.as_str())]).ignore();
    }
    let _: () = pipe.query_async(connection).await?;
    for key in ready {
        state.insert(key, State::Queued);
    }
    Ok(())
}

/// Re-queues tasks that Redis says are queued but that no stream entry
/// carries any more: the entry was lost in a Redis crash. A task still in
/// the stream (pending or not) is left alone.
async fn requeue_lost(
    connection: &mut ConnectionManager,
    keys: &Keys,
    sweep: &str,
    plan: &Plan,
    state: &HashMap<TaskKey, State>,
) -> Result<(), QueueError> {
    let queued: Vec<&TaskKey> = plan.tasks.iter().map(|t| &t.key).filter(|k| state[*k] == State::Queued).collect();
    if queued.is_empty() {
        return Ok(());
    }
    let entries: Vec<(String, HashMap<String, String>)> =
        redis::cmd("XRANGE").arg(keys.queue()).arg("-").arg("+").query_async(connection).await?;
    let present: std::collections::HashSet<&str> = entries
        .iter()
        .filter(|(_, f)| f.get("sweep").map(String::as_str) == Some(sweep))
        .filter_map(|(_, f)| f.get("key").map(String::as_str))
        .collect();
    let recorded: HashMap<String, String> = connection.hgetall(keys.state(sweep)).await?;
    let lost: Vec<&&TaskKey> = queued
        .iter()
        .filter(|k| {
            !present.contains(k.0.as_str())
                && recorded.get(&k.0).map(String::as_str) != Some("done")
                && recorded.get(&k.0).map(String::as_str) != Some("failed")
        })
        .collect();
    for key in lost {
        let _: () = connection.xadd(keys.queue(), "*", &[("sweep", sweep), ("key", key.0.as_str())]).await?;
        let _: () = connection.hset(keys.state(sweep), &key.0, "queued").await?;
    }
    Ok(())
}

fn propagate_failures(plan: &Plan, state: &mut HashMap<TaskKey, State>) {
    for task in &plan.tasks {
        if state[&task.key] == State::Waiting && task.inputs.iter().any(|i| state[&i.key] == State::Failed) {
            state.insert(task.key.clone(), State::Failed);
        }
    }
}

async fn alive_workers(connection: &mut ConnectionManager, keys: &Keys) -> Result<usize, QueueError> {
    let beats: HashMap<String, u64> = connection.hgetall(keys.workers()).await?;
    let now = now_ms();
    Ok(beats.values().filter(|&&beat| now.saturating_sub(beat) < ALIVE_WITHIN.as_millis() as u64).count())
}

fn run_counts(plan: &Plan, state: &HashMap<TaskKey, State>) -> RunCounts {
    RunCounts::tally(plan, |key| match state[key] {
        State::Done => TaskOutcome::Done,
        State::Failed => TaskOutcome::Failed,
        State::Waiting | State::Queued => TaskOutcome::Pending,
    })
}
