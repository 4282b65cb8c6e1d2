//! `qsweep worker`: takes tasks from the Redis queue, runs them, records
//! their outcomes, and keeps a lease on each task while it runs.
//!
//! On SIGTERM (a pod being stopped), SIGINT or SIGHUP a worker takes no
//! more tasks and gives the stages it runs `--drain-secs` to finish; a
//! stage still running then is abandoned and its task handed back to the
//! queue at once, so another worker takes it within seconds rather than a
//! lease period. Its staging directories are removed and it exits 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tokio::sync::watch;

use super::connection::connect;
use super::{now_ms, record_outcome, requeue, Keys, PendingTask, TaskResult, GROUP};
use crate::artifacts::ObjectArtifacts;
use crate::owner;
use crate::plan::{Plan, TaskKey};
use crate::queue::QueueError;
use crate::store::{unix_now, FailureRecord, ResultsDir};
use crate::sweep::{self, Sweep};
use crate::worker::{self, Attempts, Outcome};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub url: String,
    pub prefix: String,
    /// Tasks run at once by this process.
    pub concurrency: usize,
    /// A task whose worker has not renewed its lease for this long is
    /// taken over by another worker.
    pub lease: Duration,
    /// Where this machine caches artifacts of sweeps that share them
    /// through an object store.
    pub cache: PathBuf,
    /// Exit once the queue has had nothing for this worker for
    /// `IDLE_EXIT`, instead of waiting for more.
    pub exit_when_idle: bool,
    /// With `exit_when_idle`: stay while this sweep still has work that
    /// its coordinator will queue (a pod of the sweep's Job must not leave
    /// while a long stage holds back the next ones).
    pub sweep: Option<String>,
    /// How long running stages get to finish after a stop signal.
    pub drain: Duration,
}

/// How a worker is told to stop: `stop` first (take no more tasks), then
/// `abandon` (leave the running stages and hand their tasks back).
#[derive(Clone)]
pub struct Stop {
    pub stop: watch::Receiver<bool>,
    pub abandon: watch::Receiver<bool>,
}

/// How long an `exit_when_idle` worker waits on an empty queue.
pub const IDLE_EXIT: Duration = Duration::from_secs(5);

/// What one worker process did.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerSummary {
    pub executed: usize,
    pub skipped: usize,
}

/// `qsweep worker` as a process: the first SIGINT, SIGTERM or SIGHUP
/// stops it taking tasks and starts the drain; the drain's end, or a
/// second signal, abandons what still runs (handed back to the queue).
/// Returns once the worker has stopped and its stages had their grace.
pub fn run_until_stopped(options: WorkerOptions) -> Result<WorkerSummary, QueueError> {
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime starts");
    let mut signals = tokio
        .block_on(async { crate::shutdown::Signals::install() })
        .map_err(|e| QueueError::Fatal(format!("cannot handle signals: {e}")))?;
    let drain = options.drain;
    let result = tokio.block_on(async {
        let (stop, stop_seen) = watch::channel(false);
        let (abandon, abandon_seen) = watch::channel(false);
        tokio::spawn(async move {
            let signal = signals.recv().await;
            tracing::warn!(
                "{}: taking no more tasks; running stages have {}s to finish",
                signal.name(),
                drain.as_secs()
            );
            let _ = stop.send(true);
            tokio::select! {
                _ = tokio::time::sleep(drain) => {}
                _ = signals.recv() => {}
            }
            let _ = abandon.send(true);
        });
        run(options, Stop { stop: stop_seen, abandon: abandon_seen }).await
    });
    tokio.shutdown_timeout(worker::STOP_GRACE);
    result
}

/// Runs until told to stop (or, with `exit_when_idle`, until the queue is
/// empty). Connection errors are retried, so a Redis restart is survived.
pub async fn run(options: WorkerOptions, stop: Stop) -> Result<WorkerSummary, QueueError> {
    let connection = connect(&options.url).await?;
    let keys = Keys::new(&options.prefix);
    ensure_group(&mut connection.clone(), &keys).await?;
    let host = owner::host();
    let mut slots = tokio::task::JoinSet::new();
    let mut names = Vec::new();
    for slot in 0..options.concurrency.max(1) {
        let name = format!("{host}-{}-{slot}", std::process::id());
        names.push(name.clone());
        let context = Slot {
            connection: connection.clone(),
            keys: keys.clone(),
            options: options.clone(),
            name,
            sweeps: HashMap::new(),
            // Look for abandoned tasks at once on start.
            last_claim_check: std::time::Instant::now() - options.lease,
        };
        slots.spawn(context.run(stop.clone()));
    }
    let mut summary = WorkerSummary::default();
    let mut results_dirs = Vec::new();
    let mut failure = None;
    while let Some(done) = slots.join_next().await {
        match done.map_err(|e| QueueError::State(format!("a worker slot panicked: {e}"))).and_then(|slot| slot) {
            Ok((slot, dirs)) => {
                summary.executed += slot.executed;
                summary.skipped += slot.skipped;
                results_dirs.extend(dirs);
            }
            Err(e) => failure = Some(e),
        }
    }
    // Every slot has stopped: what this process still has in staging was
    // abandoned, and no live stage of ours can lose its directory.
    for results in results_dirs {
        if let Err(e) = results.remove_own_staging() {
            tracing::warn!("cannot remove this worker's staging directories in {}: {e}", results.root().display());
        }
    }
    let mut connection = connection;
    let _: Result<(), _> = connection.hdel(keys.workers(), &names).await;
    failure.map_or(Ok(summary), Err)
}

/// The environment variable that names a worker's host: its consumer
/// names begin with it, which is how the coordinator finds a dead pod's
/// tasks.
pub const WORKER_HOST_ENV: &str = owner::HOST_ENV;

pub async fn ensure_group(connection: &mut ConnectionManager, keys: &Keys) -> Result<(), QueueError> {
    let created: Result<(), redis::RedisError> = connection.xgroup_create_mkstream(keys.queue(), GROUP, "0").await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => Ok(other?),
    }
}

/// A sweep as a worker needs it, loaded from Redis for one identity.
struct LoadedSweep {
    sweep: Arc<Sweep>,
    plan: Arc<Plan>,
    /// The shared results directory, or this machine's cache of an
    /// object store's artifacts.
    results: ResultsDir,
    store: Option<ObjectArtifacts>,
}

/// One concurrent consumer of the queue.
struct Slot {
    connection: ConnectionManager,
    keys: Keys,
    options: WorkerOptions,
    name: String,
    /// By sweep name: the sweep as last loaded, or why it cannot be.
    sweeps: HashMap<String, (String, Result<Arc<LoadedSweep>, String>)>,
    last_claim_check: std::time::Instant,
}

/// What became of one queue entry.
enum Handled {
    Executed,
    Skipped,
    /// Stopped by shutdown and given back to the queue.
    HandedBack,
}

impl Slot {
    /// Returns what it did and the results directories it wrote to.
    async fn run(mut self, stop: Stop) -> Result<(WorkerSummary, Vec<ResultsDir>), QueueError> {
        let mut summary = WorkerSummary::default();
        let mut idle_since = std::time::Instant::now();
        while !*stop.stop.borrow() {
            match self.next_entry().await {
                // A stop that came while waiting on the queue: give it back untouched.
                Ok(Some(entry)) if *stop.stop.borrow() => {
                    if let Err(e) = requeue(&mut self.connection, &self.keys, &PendingTask::from_entry(&entry)).await {
                        tracing::warn!("worker {}: cannot hand back {}: {e}", self.name, entry.id);
                    }
                }
                Ok(Some(entry)) => match self
                    .handle(&entry, stop.abandon.clone())
                    .await
                    .inspect(|_| idle_since = std::time::Instant::now())
                {
                    Ok(Handled::Executed) => summary.executed += 1,
                    Ok(Handled::Skipped) => summary.skipped += 1,
                    Ok(Handled::HandedBack) => {}
                    Err(e) => {
                        tracing::warn!("worker {}: {e}; retrying", self.name);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                Ok(None) if self.options.exit_when_idle && idle_since.elapsed() > IDLE_EXIT => {
                    match self.sweep_has_work().await {
                        Ok(false) => break,
                        Ok(true) => {}
                        Err(e) => tracing::warn!("worker {}: {e}; retrying", self.name),
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    // Most likely Redis is restarting: wait, the manager reconnects.
                    tracing::warn!("worker {}: {e}; retrying", self.name);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let dirs = self.sweeps.into_values().filter_map(|(_, loaded)| loaded.ok()).map(|l| l.results.clone()).collect();
        Ok((summary, dirs))
    }

    /// An abandoned entry whose lease expired, else a new one. Looking
    /// for abandoned entries (and beating the heartbeat) every half lease,
    /// and at least every 3 s for `qsweep status`, is often enough:
    /// nothing is abandoned for less than a lease.
    async fn next_entry(&mut self) -> Result<Option<StreamId>, QueueError> {
        if self.last_claim_check.elapsed() >= (self.options.lease / 2).min(Duration::from_secs(3)) {
            self.last_claim_check = std::time::Instant::now();
            let _: () = self.connection.hset(self.keys.workers(), &self.name, now_ms()).await?;
            let lease_ms = self.options.lease.as_millis() as u64;
            let options = StreamAutoClaimOptions::default().count(1);
            let claimed: StreamAutoClaimReply = self
                .connection
                .xautoclaim_options(self.keys.queue(), GROUP, &self.name, lease_ms, "0-0", options)
                .await?;
            if let Some(entry) = claimed.claimed.into_iter().next() {
                return Ok(Some(entry));
            }
        }
        let options = StreamReadOptions::default().group(GROUP, &self.name).count(1).block(500);
        let read: Option<StreamReadReply> =
            self.connection.xread_options(&[self.keys.queue()], &[">"], &options).await?;
        Ok(read.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()))
    }

    /// Whether the sweep this worker serves still has tasks waiting or
    /// queued, as its coordinator last said (no sweep named: none).
    async fn sweep_has_work(&mut self) -> Result<bool, QueueError> {
        let Some(sweep) = &self.options.sweep else { return Ok(false) };
        let (left, cancelled): (Option<u64>, Option<String>) = redis::pipe()
            .hget(self.keys.sweep(sweep), "left")
            .hget(self.keys.sweep(sweep), "cancelled")
            .query_async(&mut self.connection)
            .await?;
        Ok(cancelled.as_deref() != Some("1") && left.unwrap_or(0) > 0)
    }

    /// Runs one entry's task.
    async fn handle(&mut self, entry: &StreamId, abandon: watch::Receiver<bool>) -> Result<Handled, QueueError> {
        let task = PendingTask::from_entry(entry);
        let (sweep_name, key) = (task.sweep.clone(), task.key.clone());
        let mut connection = self.connection.clone();
        let (cancelled, identity, state): (Option<String>, Option<String>, Option<String>) = redis::pipe()
            .hget(self.keys.sweep(&sweep_name), "cancelled")
            .hget(self.keys.sweep(&sweep_name), "identity")
            .hget(self.keys.state(&sweep_name), &key.0)
            .query_async(&mut connection)
            .await?;
        // An entry queued for an earlier identity of the sweep: its
        // coordinator is gone or has republished, and queues its own.
        let superseded = identity.as_deref() != Some(task.identity.as_str());
        let settled = matches!(state.as_deref(), Some("done" | "failed" | "fatal"));
        if superseded || settled || cancelled.as_deref() == Some("1") {
            self.finish_entry(&entry.id).await?;
            return Ok(Handled::Skipped);
        }
        let loaded = self.load(&sweep_name, &task.identity).await?;
        if self.sweeps.get(&sweep_name).is_none_or(|(loaded_as, _)| *loaded_as != task.identity) {
            // Republished while this worker looked: the task is superseded.
            self.finish_entry(&entry.id).await?;
            return Ok(Handled::Skipped);
        }
        let loaded = match loaded {
            Ok(loaded) => loaded,
            // This worker cannot use the sweep (it does not see the model
            // or data, say); another worker, or a rerun, may: not fatal.
            Err(message) => {
                self.record(&task, None, TaskResult::Failed(&message)).await?;
                return Ok(Handled::Skipped);
            }
        };
        let Some(planned) = loaded.plan.task(&key).cloned() else {
            let message = format!("task {key} is not in the plan of sweep {sweep_name}");
            self.record(&task, Some(&loaded), TaskResult::Fatal(&message)).await?;
            return Ok(Handled::Skipped);
        };
        // An artifact that is complete and current is done work, even if
        // Redis forgot it.
        let complete = match &loaded.store {
            Some(store) => {
                let there = store.fetch_manifest(&loaded.results, &key).await;
                there.map_err(|e| QueueError::State(e.to_string()))?
                    && loaded.results.current_manifest(&planned).is_some()
            }
            None => loaded.results.current(&planned).is_some(),
        };
        if complete {
            self.record(&task, Some(&loaded), TaskResult::Done).await?;
            return Ok(Handled::Skipped);
        }
        if let Some(store) = &loaded.store {
            for input in &planned.inputs {
                if let Err(e) = store.fetch(&loaded.results, &input.key).await {
                    self.record(&task, Some(&loaded), TaskResult::Failed(&e.to_string())).await?;
                    return Ok(Handled::Skipped);
                }
            }
        }
        let _: () = connection.hincr(self.keys.executions(&sweep_name), &key.0, 1).await?;
        let heartbeat = tokio::spawn(renew_lease(
            connection.clone(),
            self.keys.clone(),
            self.name.clone(),
            entry.id.clone(),
            self.options.lease,
        ));
        let policy =
            Attempts { retries: loaded.sweep.spec.retries, timeout: Duration::from_secs(loaded.sweep.spec.timeout) };
        let listener = Arc::new(LogListener { worker: self.name.clone(), key: key.clone() });
        let outcome = worker::run_task(
            Arc::new(planned),
            loaded.sweep.clone(),
            loaded.results.clone(),
            policy,
            abandon,
            listener,
        )
        .await;
        heartbeat.abort();
        match outcome {
            Outcome::Done(_) => {
                // Publish before recording: a recorded task's artifact is in the store.
                let published = match &loaded.store {
                    Some(store) => store.publish(&loaded.results, &key).await.map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let result = match &published {
                    Ok(()) => TaskResult::Done,
                    Err(e) => TaskResult::Failed(e),
                };
                self.record(&task, Some(&loaded), result).await?
            }
            // The failure record is already in the results directory.
            Outcome::Failed(record) => {
                let result =
                    if record.fatal { TaskResult::Fatal(&record.error) } else { TaskResult::Failed(&record.error) };
                self.record(&task, Some(&loaded), result).await?
            }
            // Shutdown: give the task back now, so that another worker
            // takes it at once instead of after the lease.
            Outcome::Cancelled => {
                requeue(&mut self.connection, &self.keys, &task).await?;
                tracing::warn!("{}: handed {} back to the queue on shutdown", self.name, key.short());
                return Ok(Handled::HandedBack);
            }
        }
        Ok(Handled::Executed)
    }

    /// The sweep as published under `identity`, loading it again when it
    /// was loaded under another.
    async fn load(&mut self, sweep_name: &str, identity: &str) -> Result<Result<Arc<LoadedSweep>, String>, QueueError> {
        if let Some((loaded_as, loaded)) = self.sweeps.get(sweep_name) {
            if loaded_as == identity {
                return Ok(loaded.clone());
            }
        }
        let mut connection = self.connection.clone();
        let definition: HashMap<String, String> = connection.hgetall(self.keys.sweep(sweep_name)).await?;
        let plan_json: Option<String> = connection.get(self.keys.plan(sweep_name)).await?;
        let loaded = (|| {
            let spec = definition.get("spec").ok_or_else(|| format!("sweep {sweep_name} has no spec in Redis"))?;
            let results =
                definition.get("results").ok_or_else(|| format!("sweep {sweep_name} has no results directory"))?;
            let label = PathBuf::from(format!("redis:{sweep_name}"));
            let sweep = sweep::load_text(&label, spec.clone()).map_err(|errors| {
                format!("this worker cannot use sweep {sweep_name} (every worker must see the model and dataset at the same paths):\n{errors}")
            })?;
            let mut plan: Plan = serde_json::from_str(plan_json.as_deref().unwrap_or("null"))
                .map_err(|e| format!("the plan of sweep {sweep_name} in Redis is damaged: {e}"))?;
            plan.reindex();
            let store_url = definition.get("artifacts").filter(|u| !u.is_empty());
            let (results, store) = match store_url {
                Some(url) => {
                    let store = ObjectArtifacts::open(url).map_err(|e| e.to_string())?;
                    let cache = self.options.cache.join(sweep_name);
                    let results = ResultsDir::create(&cache)
                        .map_err(|e| format!("this worker cannot write its artifact cache {}: {e}", cache.display()))?;
                    (results, Some(store))
                }
                None => {
                    let results = ResultsDir::create(Path::new(results)).map_err(|e| {
                        format!("this worker cannot write the shared results directory {results}: {e}; every worker must see it at the same path")
                    })?;
                    (results, None)
                }
            };
            // Staging left by crashed workers of this host is swept here,
            // so repeated crashes do not leak disk.
            if let Err(e) = results.remove_abandoned_staging(|_| false) {
                tracing::warn!("cannot sweep abandoned staging in {}: {e}", results.root().display());
            }
            Ok(Arc::new(LoadedSweep { sweep: Arc::new(sweep), plan: Arc::new(plan), results, store }))
        })();
        // Loaded under the identity Redis has now, which the caller compares.
        let loaded_as = definition.get("identity").cloned().unwrap_or_default();
        self.sweeps.insert(sweep_name.to_string(), (loaded_as, loaded.clone()));
        Ok(loaded)
    }

    /// Records a task's outcome in Redis, and a failure in the results too.
    async fn record(
        &mut self,
        task: &PendingTask,
        loaded: Option<&LoadedSweep>,
        result: TaskResult<'_>,
    ) -> Result<(), QueueError> {
        if let (TaskResult::Failed(message) | TaskResult::Fatal(message), Some(loaded)) = (result, loaded) {
            if loaded.results.failure(&task.key).is_none() {
                let stage = loaded.plan.task(&task.key).map(|t| t.stage).unwrap_or(crate::plan::StageKind::Build);
                let record = FailureRecord {
                    key: task.key.clone(),
                    stage,
                    attempts: 1,
                    error: message.to_string(),
                    failed_unix: unix_now(),
                    fatal: matches!(result, TaskResult::Fatal(_)),
                };
                let _ = loaded.results.record_failure(&record);
            }
        }
        record_outcome(&mut self.connection, &self.keys, task, &self.name, result).await
    }

    async fn finish_entry(&mut self, entry: &str) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.xack(self.keys.queue(), GROUP, &[entry]).xdel(self.keys.queue(), &[entry]);
        let _: () = pipe.query_async(&mut self.connection).await?;
        Ok(())
    }
}

/// A remote worker's task tells its retries and progress to the log (a
/// pod's log, `kubectl logs`).
struct LogListener {
    worker: String,
    key: TaskKey,
}

impl worker::Listener for LogListener {
    fn retrying(&self, attempt: u32, error: &str) {
        tracing::warn!("{}: retrying {} after attempt {attempt}: {error}", self.worker, self.key);
    }

    fn progress(&self, text: &str) {
        tracing::info!("{}: {} {text}", self.worker, self.key.short());
    }
}

/// Keeps the lease on `entry` while its task runs: re-claiming the entry
/// resets its idle time, and the heartbeat tells `qsweep status` the worker
/// lives.
async fn renew_lease(mut connection: ConnectionManager, keys: Keys, worker: String, entry: String, lease: Duration) {
    loop {
        // The entry was just delivered, so its idle time starts at zero.
        tokio::time::sleep(lease / 3).await;
        let mut pipe = redis::pipe();
        pipe.cmd("XCLAIM").arg(keys.queue()).arg(GROUP).arg(&worker).arg(0).arg(&entry).arg("JUSTID").ignore();
        pipe.hset(keys.workers(), &worker, now_ms()).ignore();
        let renewed: Result<(), redis::RedisError> = pipe.query_async(&mut connection).await;
        if let Err(e) = renewed {
            tracing::warn!("worker {worker}: cannot renew its lease: {e}");
        }
    }
}
