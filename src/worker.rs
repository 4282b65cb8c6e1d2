//! Runs one task to an outcome: attempts with a timeout, retries as the
//! spec allows, and a failure record when they are used up.
//!
//! Stage code is blocking (ONNX Runtime, file I/O), so each attempt runs on
//! tokio's blocking pool. A timeout or Ctrl-C cannot kill that thread; it
//! raises the attempt's cancel flag, which stages check between batches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::plan::Task;
use crate::stages::{self, StageContext, StageError};
use crate::store::{unix_now, FailureRecord, Manifest, ResultsDir};
use crate::sweep::Sweep;

/// How a task ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Manifest),
    Failed(FailureRecord),
    /// Stopped by shutdown; the task stays pending and reruns next time.
    Cancelled,
}

/// Retry policy, from the spec.
#[derive(Debug, Clone, Copy)]
pub struct Attempts {
    pub retries: u32,
    pub timeout: Duration,
}

/// Where a task's progress and retries are told.
pub trait Listener: Send + Sync + 'static {
    /// A failed attempt that will be retried.
    fn retrying(&self, attempt: u32, error: &str);
    /// The stage's own progress line.
    fn progress(&self, text: &str);
}

/// How long a stage told to stop by shutdown gets to notice before it is
/// left behind (its thread ends with the process; its staging directory
/// is then swept as abandoned).
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs `task` until it succeeds, fails for good, or shutdown is signalled.
pub async fn run_task(
    task: Arc<Task>,
    sweep: Arc<Sweep>,
    results: ResultsDir,
    policy: Attempts,
    mut shutdown: watch::Receiver<bool>,
    listener: Arc<dyn Listener>,
) -> Outcome {
    let mut last_error = String::new();
    let mut fatal = false;
    let mut attempt = 0;
    while attempt <= policy.retries {
        attempt += 1;
        if *shutdown.borrow() {
            return Outcome::Cancelled;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let handle = tokio::task::spawn_blocking({
            let (task, sweep, results, cancel) = (task.clone(), sweep.clone(), results.clone(), cancel.clone());
            let listener = listener.clone();
            move || {
                let report = |text: &str| listener.progress(text);
                stages::execute(
                    &task,
                    &StageContext { sweep: &sweep, results: &results, cancel: &cancel, report: &report },
                )
            }
        });
        tokio::pin!(handle);
        let result = tokio::select! {
            joined = &mut handle => joined.unwrap_or_else(|panic| Err(StageError::Fatal(format!("the stage panicked: {panic}")))),
            _ = tokio::time::sleep(policy.timeout) => {
                cancel.store(true, Ordering::Relaxed);
                let _ = (&mut handle).await;
                Err(StageError::Retryable(format!("timed out after {}s", policy.timeout.as_secs())))
            }
            // The guard `wait_for` returns must not live across the await below.
            _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => {
                cancel.store(true, Ordering::Relaxed);
                let _ = tokio::time::timeout(STOP_GRACE, &mut handle).await;
                return Outcome::Cancelled;
            }
        };
        match result {
            Ok(manifest) => {
                let _ = results.clear_failure(&task.key);
                return Outcome::Done(manifest);
            }
            Err(StageError::Cancelled) => return Outcome::Cancelled,
            Err(StageError::Fatal(message)) => {
                last_error = message;
                fatal = true;
                break;
            }
            // Another attempt would find the input gone; the coordinator
            // makes it again first.
            Err(StageError::DamagedInput(message)) => {
                last_error = message;
                break;
            }
            Err(StageError::Retryable(message)) => {
                if attempt <= policy.retries {
                    listener.retrying(attempt, &message);
                }
                last_error = message;
            }
        }
    }
    let record = FailureRecord {
        key: task.key.clone(),
        stage: task.stage,
        attempts: attempt,
        error: last_error,
        failed_unix: unix_now(),
        fatal,
    };
    if let Err(e) = results.record_failure(&record) {
        tracing::error!("cannot record the failure of {} {}: {e}", task.stage, task.key.short());
    }
    Outcome::Failed(record)
}
