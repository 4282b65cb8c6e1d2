//! `qsweep worker`: takes tasks from the Redis queue, runs them, records
//! their outcomes, and keeps a lease on each task while it runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tokio::sync::watch;

use super::connection::connect;
use super::{now_ms, record_outcome, Keys, PendingTask, GROUP};
use crate::artifacts::ObjectArtifacts;
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
}

/// How long an `exit_when_idle` worker waits on an empty queue.
pub const IDLE_EXIT: Duration = Duration::from_secs(5);

/// What one worker process did.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerSummary {
    pub executed: usize,
    pub skipped: usize,
}

/// Runs until shutdown is signalled (or, with `exit_when_idle`, until the
/// queue is empty). Connection errors are retried, so a Redis restart is
/// survived.
pub async fn run(options: WorkerOptions, shutdown: watch::Receiver<bool>) -> Result<WorkerSummary, QueueError> {
    let connection = connect(&options.url).await?;
    let keys = Keys::new(&options.prefix);
    ensure_group(&mut connection.clone(), &keys).await?;
    let host = worker_host();
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..options.concurrency.max(1) {
        let name = format!("{host}-{}-{slot}", std::process::id());
        let context = Slot {
            connection: connection.clone(),
            keys: keys.clone(),
            options: options.clone(),
            name,
            sweeps: HashMap::new(),
            // Look for abandoned tasks at once on start.
            last_claim_check: std::time::Instant::now() - options.lease,
        };
        slots.spawn(context.run(shutdown.clone()));
    }
    let mut summary = WorkerSummary::default();
    while let Some(done) = slots.join_next().await {
        let slot = done.map_err(|e| QueueError::State(format!("a worker slot panicked: {e}")))??;
        summary.executed += slot.executed;
        summary.skipped += slot.skipped;
    }
    Ok(summary)
}

/// Where a worker's consumer names begin: the pod's name when a Job's
/// pod says so (the coordinator finds a dead pod's tasks by it), else the
/// hostname.
fn worker_host() -> String {
    std::env::var(WORKER_HOST_ENV)
        .ok()
        .filter(|host| !host.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_default()
}

/// The environment variable that names a worker's host (see `worker_host`).
pub const WORKER_HOST_ENV: &str = "QSWEEP_WORKER_HOST";

pub async fn ensure_group(connection: &mut ConnectionManager, keys: &Keys) -> Result<(), QueueError> {
    let created: Result<(), redis::RedisError> = connection.xgroup_create_mkstream(keys.queue(), GROUP, "0").await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => Ok(other?),
    }
}

/// A sweep as a worker needs it, loaded once from Redis.
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
    sweeps: HashMap<String, Result<Arc<LoadedSweep>, String>>,
    last_claim_check: std::time::Instant,
}

impl Slot {
    async fn run(mut self, shutdown: watch::Receiver<bool>) -> Result<WorkerSummary, QueueError> {
        let mut summary = WorkerSummary::default();
        let mut idle_since = std::time::Instant::now();
        while !*shutdown.borrow() {
            match self.next_entry().await {
                Ok(Some(entry)) => match self
                    .handle(&entry, shutdown.clone())
                    .await
                    .inspect(|_| idle_since = std::time::Instant::now())
                {
                    Ok(true) => summary.executed += 1,
                    Ok(false) => summary.skipped += 1,
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
        Ok(summary)
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

    /// Runs one entry's task. Returns whether a stage was executed.
    async fn handle(&mut self, entry: &StreamId, shutdown: watch::Receiver<bool>) -> Result<bool, QueueError> {
        let field = |name: &str| entry.get::<String>(name).unwrap_or_default();
        let (sweep_name, key) = (field("sweep"), TaskKey(field("key")));
        let mut connection = self.connection.clone();
        let (cancelled, state): (Option<String>, Option<String>) = redis::pipe()
            .hget(self.keys.sweep(&sweep_name), "cancelled")
            .hget(self.keys.state(&sweep_name), &key.0)
            .query_async(&mut connection)
            .await?;
        if cancelled.as_deref() == Some("1") || matches!(state.as_deref(), Some("done") | Some("failed")) {
            self.finish_entry(&entry.id).await?;
            return Ok(false);
        }
        let loaded = match self.load(&sweep_name).await? {
            Ok(loaded) => loaded,
            Err(message) => {
                self.record(&sweep_name, &key, &entry.id, Err(message)).await?;
                return Ok(false);
            }
        };
        let Some(task) = loaded.plan.task(&key).cloned() else {
            self.record(
                &sweep_name,
                &key,
                &entry.id,
                Err(format!("task {key} is not in the plan of sweep {sweep_name}")),
            )
            .await?;
            return Ok(false);
        };
        // An artifact that is complete is done work, even if Redis forgot it.
        let complete = match &loaded.store {
            Some(store) => store.manifest(&key).await.map_err(|e| QueueError::State(e.to_string()))?.is_some(),
            None => loaded.results.verified(&key).is_some(),
        };
        if complete {
            self.record(&sweep_name, &key, &entry.id, Ok(())).await?;
            return Ok(false);
        }
        if let Some(store) = &loaded.store {
            for input in &task.inputs {
                if let Err(e) = store.fetch(&loaded.results, &input.key).await {
                    self.record(&sweep_name, &key, &entry.id, Err(e.to_string())).await?;
                    return Ok(false);
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
        let outcome =
            worker::run_task(Arc::new(task), loaded.sweep.clone(), loaded.results.clone(), policy, shutdown, listener)
                .await;
        heartbeat.abort();
        match outcome {
            Outcome::Done(_) => {
                // Publish before recording: a recorded task's artifact is in the store.
                let published = match &loaded.store {
                    Some(store) => store.publish(&loaded.results, &key).await.map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                self.record(&sweep_name, &key, &entry.id, published).await?
            }
            // The failure record is already in the results directory.
            Outcome::Failed(record) => self.record(&sweep_name, &key, &entry.id, Err(record.error)).await?,
            // Shutdown: leave the entry pending, so another worker takes it
            // over when the lease runs out.
            Outcome::Cancelled => {}
        }
        Ok(true)
    }

    async fn load(&mut self, sweep_name: &str) -> Result<Result<Arc<LoadedSweep>, String>, QueueError> {
        if let Some(loaded) = self.sweeps.get(sweep_name) {
            return Ok(loaded.clone());
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
            Ok(Arc::new(LoadedSweep { sweep: Arc::new(sweep), plan: Arc::new(plan), results, store }))
        })();
        self.sweeps.insert(sweep_name.to_string(), loaded.clone());
        Ok(loaded)
    }

    /// Records a task's outcome in Redis, and a failure in the results too.
    async fn record(
        &mut self,
        sweep_name: &str,
        key: &TaskKey,
        entry: &str,
        outcome: Result<(), String>,
    ) -> Result<(), QueueError> {
        if let (Err(message), Some(loaded)) = (&outcome, self.sweeps.get(sweep_name).and_then(|l| l.as_ref().ok())) {
            if loaded.results.failure(key).is_none() {
                let stage = loaded.plan.task(key).map(|t| t.stage).unwrap_or(crate::plan::StageKind::Build);
                let record = FailureRecord {
                    key: key.clone(),
                    stage,
                    attempts: 1,
                    error: message.clone(),
                    failed_unix: unix_now(),
                };
                let _ = loaded.results.record_failure(&record);
            }
        }
        let task = PendingTask { entry: entry.to_string(), sweep: sweep_name.to_string(), key: key.clone() };
        record_outcome(
            &mut self.connection,
            &self.keys,
            &task,
            &self.name,
            outcome.as_ref().map_err(String::as_str).copied(),
        )
        .await
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
