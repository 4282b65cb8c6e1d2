//! `qsweep run` from set-up to outcome, in the order that keeps a refused
//! run from leaving anything behind.
//!
//! Every check that can refuse the run comes before the first write: the
//! engine on this machine (or, for pods, the Job the spec implies), the
//! object-store URL, the signal handlers, the Redis connection, the
//! cluster's permissions and the sweep's coordinator lease. Only then are
//! the results directory, its lock and plan.json made, so a set-up error
//! exits 2 with no results directory, no artifacts/ or failures/ and no
//! plan.json (the brief's "spec errors leave nothing written").

use std::path::PathBuf;
use std::sync::Arc;

use crate::artifacts::{Artifacts, ObjectArtifacts};
use crate::coordinator::{self, RunSummary};
use crate::engine;
use crate::k8s::backend::{ClusterOptions, KubernetesQueue};
use crate::k8s::cluster::Cluster;
use crate::plan::Plan;
use crate::queue::memory::MemoryQueue;
use crate::queue::QueueError;
use crate::redis_queue::{self, queue::RedisQueue};
use crate::report::{self, RunResult};
use crate::shutdown::{Signal, Signals};
use crate::store::ResultsDir;
use crate::sweep::Sweep;

/// Where a sweep's tasks run.
#[allow(clippy::large_enum_variant)] // one per process, moved once
pub enum Target {
    /// In this process, `jobs` stages at once.
    Local { jobs: usize },
    /// On `qsweep worker` processes through Redis; with `cluster`, on a
    /// Kubernetes Job of them that the coordinator creates.
    Redis { url: String, prefix: String, artifacts: Option<String>, cluster: Option<ClusterTarget> },
}

/// The Kubernetes side of a `--backend k8s` run.
pub struct ClusterTarget {
    pub context: Option<String>,
    pub namespace: String,
    pub options: ClusterOptions,
}

/// What `qsweep run` is asked to do.
pub struct Launch {
    pub sweep: Sweep,
    pub plan: Plan,
    pub results: PathBuf,
    /// The command, as the results directory's lock names its holder.
    pub command: String,
    pub target: Target,
}

/// Why a run did not start, or stopped short of its tasks: nothing is
/// reported; `qsweep run` exits 2.
#[derive(Debug)]
pub struct SetupError(pub String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<QueueError> for SetupError {
    fn from(error: QueueError) -> Self {
        SetupError(error.to_string())
    }
}

/// A coordinated sweep: what ran, the stop signal if one ended it, and
/// the reports written from what the results directory holds.
pub struct Outcome {
    pub summary: RunSummary,
    pub signal: Option<Signal>,
    pub reported: std::io::Result<Vec<RunResult>>,
    /// Cleanup that failed after the sweep; the results stand.
    pub cleanup_warning: Option<String>,
}

/// Runs the sweep: set-up checks, then the results directory, then the
/// coordinator against the target's queue, then the reports.
pub fn run(launch: Launch) -> Result<Outcome, SetupError> {
    let Launch { sweep, plan, results: dir, command, target } = launch;
    if let Target::Local { .. } | Target::Redis { cluster: None, .. } = target {
        // The stages run here (or on workers that load the same library),
        // so a missing library or GPU provider is said before any work
        // rather than as the failure of every build. Pods bring their own.
        engine::check_engine(sweep.spec.evaluate.engine).map_err(|e| SetupError(e.to_string()))?;
    }
    let store = match &target {
        Target::Redis { artifacts: Some(url), .. } => {
            Some(ObjectArtifacts::open(url).map_err(|e| SetupError(e.to_string()))?)
        }
        _ => None,
    };
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime starts");
    let mut signals =
        tokio.block_on(async { Signals::install() }).map_err(|e| SetupError(format!("cannot handle signals: {e}")))?;
    let target = match target {
        Target::Local { jobs } => Reached::Local { jobs },
        Target::Redis { url, prefix, artifacts, cluster } => {
            let connected = tokio.block_on(connect(&url, &prefix, &plan, &sweep.spec.name, cluster))?;
            Reached::Redis { connected, artifacts }
        }
    };

    // Every check passed: from here on the run writes.
    let (results, _lock) = match open_results(&dir, &command) {
        Ok(opened) => opened,
        Err(e) => {
            if let Reached::Redis { connected, .. } = target {
                // Let the next coordinator in now, not when the lease expires.
                tokio.block_on(connected.lease.release());
            }
            return Err(e);
        }
    };
    // What is there before this run adds to it, for the report to tell
    // reused artifacts from those the run makes. Only the stored copy
    // holds it: the plan a Redis sweep publishes must stay the same when
    // a coordinator restarts partway, or its queued state is dropped.
    let mut stored = plan.clone();
    stored.present_at_start =
        plan.tasks.iter().filter_map(|t| results.manifest(&t.key)).map(|m| m.short_digest().to_string()).collect();
    let save_plan =
        || results.save_plan(&stored).map_err(|e| QueueError::State(format!("cannot write to {}: {e}", dir.display())));
    let artifacts = match &store {
        Some(store) => Artifacts::Store { results: &results, store },
        None => Artifacts::Shared(&results),
    };

    let caught = std::sync::OnceLock::new();
    let interrupt = Box::pin(async {
        let _ = caught.set(signals.recv().await);
    });
    let coordinated = tokio.block_on(async {
        match target {
            Reached::Local { jobs } => {
                save_plan()?;
                let mut queue = MemoryQueue::new(Arc::new(sweep), results.clone(), jobs);
                coordinator::run(&plan, artifacts, &mut queue, interrupt).await
            }
            Reached::Redis { connected: Connected { connection, keys, lease, cluster }, artifacts: store_url } => {
                let queue =
                    RedisQueue::publish(lease, connection, keys, &sweep, &plan, &results, store_url.as_deref()).await?;
                save_plan()?;
                let (mut connection, keys) = (queue.connection(), queue.keys().clone());
                remove_staging_of_gone_workers(&mut connection, &keys, &results).await?;
                let summary = match cluster {
                    Some((cluster, options)) => {
                        let pending = plan.tasks.len() - results.cached_tasks(&plan).len();
                        let mut queue =
                            KubernetesQueue::start(queue, cluster, &sweep.spec.name, pending, options).await?;
                        coordinator::run(&plan, artifacts, &mut queue, interrupt).await
                    }
                    None => coordinator::run(&plan, artifacts, &mut { queue }, interrupt).await,
                }?;
                // Workers killed during the sweep leave no staging behind it.
                remove_staging_of_gone_workers(&mut connection, &keys, &results).await?;
                Ok(summary)
            }
        }
    });
    // A stage left running by a signal must not hold the exit up; what it
    // had in staging goes with it.
    tokio.shutdown_timeout(crate::worker::STOP_GRACE);
    let cleanup_warning = results
        .remove_own_staging()
        .and_then(|_| results.remove_abandoned_staging(|_| false))
        .err()
        .map(|e| format!("cannot remove staging directories in {}: {e}", dir.display()));
    let summary = coordinated.map_err(|e| match &cleanup_warning {
        Some(warning) => SetupError(format!("{e}\nwarning: {warning}")),
        None => SetupError(e.to_string()),
    })?;
    let reported = report::write_all(&results);
    Ok(Outcome { summary, signal: caught.get().copied(), reported, cleanup_warning })
}

/// The results directory, made if need be, locked, with abandoned
/// staging removed: the run's first writes.
fn open_results(dir: &std::path::Path, command: &str) -> Result<(ResultsDir, crate::store::ResultsLock), SetupError> {
    let results = ResultsDir::create(dir).map_err(|e| {
        SetupError(format!(
            "cannot write results to {}: {e}\n  fix: choose a writable directory with --results DIR",
            dir.display()
        ))
    })?;
    let lock = results.lock(command).map_err(|e| SetupError(e.to_string()))?;
    results
        .remove_abandoned_staging(|_| false)
        .map_err(|e| SetupError(format!("cannot write to {}: {e}", dir.display())))?;
    Ok((results, lock))
}

/// A target whose checks have passed.
#[allow(clippy::large_enum_variant)] // one per process, moved once
enum Reached {
    Local { jobs: usize },
    Redis { connected: Connected, artifacts: Option<String> },
}

/// A Redis target checked and claimed before anything is written.
struct Connected {
    connection: redis::aio::ConnectionManager,
    keys: redis_queue::Keys,
    lease: redis_queue::lease::Lease,
    cluster: Option<(Cluster, ClusterOptions)>,
}

/// Reaches Redis (and the cluster, whose permissions are reviewed and
/// which checks the worker Job in a dry run, so a missing namespace or a
/// Job admission refuses is named now), then takes the sweep's
/// coordinator lease, so a second coordinator is refused before it writes.
async fn connect(
    url: &str,
    prefix: &str,
    plan: &Plan,
    sweep: &str,
    cluster: Option<ClusterTarget>,
) -> Result<Connected, QueueError> {
    let connection = redis_queue::connection::connect(url).await?;
    let keys = redis_queue::Keys::new(prefix);
    let cluster = match cluster {
        Some(target) => {
            let cluster = Cluster::connect(target.context.as_deref(), &target.namespace).await?;
            cluster.check_access().await?;
            let job = crate::k8s::worker_job(sweep, Some(&target.options.resources), 1, &target.options.job, 1)
                .map_err(|e| QueueError::Fatal(e.to_string()))?;
            cluster.check_job(&job).await?;
            Some((cluster, target.options))
        }
        None => None,
    };
    let lease = RedisQueue::claim(connection.clone(), &keys, &plan.sweep).await?;
    Ok(Connected { connection, keys, lease, cluster })
}

/// Removes staging directories of workers on other hosts whose Redis
/// heartbeat has expired (this host's dead processes are found by PID).
async fn remove_staging_of_gone_workers(
    connection: &mut redis::aio::ConnectionManager,
    keys: &redis_queue::Keys,
    results: &ResultsDir,
) -> Result<(), QueueError> {
    let gone = redis_queue::queue::gone_workers(connection, keys).await?;
    results
        .remove_abandoned_staging(|owner| gone.contains(&(owner.host.clone(), owner.pid)))
        .map_err(|e| QueueError::State(format!("cannot sweep staging in {}: {e}", results.root().display())))?;
    Ok(())
}
