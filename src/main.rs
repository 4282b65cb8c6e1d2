//! The `qsweep` command line: parses flags, calls the library, and maps
//! outcomes to exit codes (0 all runs ok, 1 some runs failed, 2 usage,
//! spec or set-up errors, 130 interrupted).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use qsweep::artifacts::ObjectArtifacts;
use qsweep::plan::Plan;
use qsweep::queue::memory::MemoryQueue;
use qsweep::queue::QueueError;
use qsweep::redis_queue::queue::RedisQueue;
use qsweep::store::ResultsDir;
use qsweep::{coordinator, engine, redis_queue, report, spec, sweep};

#[derive(Parser)]
#[command(name = "qsweep", version, about = "Runs int8 quantization experiment sweeps on CNN models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks a spec; prints every error and exits 2 if there is any.
    Validate { spec: PathBuf },
    /// Shows the runs, their stages, shared stages, and what is cached.
    Plan {
        spec: PathBuf,
        /// Prints the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Where to look for cached results [default: results/<sweep name>].
        #[arg(long)]
        results: Option<PathBuf>,
    },
    /// Runs a sweep, skipping stages whose results are already complete.
    Run {
        spec: PathBuf,
        /// Stages run at once (local runs).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
        jobs: u32,
        /// Results directory [default: results/<sweep name>]; with --redis,
        /// every worker must see it at the same path.
        #[arg(long)]
        results: Option<PathBuf>,
        #[command(flatten)]
        redis: OptionalRedis,
        #[command(flatten)]
        kubernetes: KubernetesArgs,
    },
    /// Takes tasks from a Redis queue and runs them.
    Worker {
        #[command(flatten)]
        redis: RedisArgs,
        /// Tasks run at once by this process.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
        concurrency: u32,
        /// Seconds without a lease renewal after which another worker takes a task over.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        lease_secs: u64,
        /// Exit when the queue has nothing left for this worker.
        #[arg(long)]
        exit_when_idle: bool,
        /// Local cache for artifacts of sweeps that use an object store.
        #[arg(long, default_value_os_t = std::env::temp_dir().join("qsweep-cache"))]
        cache: PathBuf,
    },
    /// Shows a Redis sweep's progress, from any machine.
    Status {
        sweep: String,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Stops a Redis sweep: the coordinator ends and workers drop its tasks.
    Cancel {
        sweep: String,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Regenerates every report from a results directory.
    Report { dir: PathBuf },
    /// Prints the JSON Schema of sweep specs.
    Schema,
}

#[derive(clap::Args)]
struct RedisArgs {
    /// Redis URL: redis://[user:password@]host:port[/db], or rediss:// for TLS.
    #[arg(long = "redis", env = "REDIS_URL", hide_env_values = true)]
    url: String,
    /// Prefix of every key, so sweeps and users can share one Redis.
    #[arg(long, default_value = "qsweep")]
    prefix: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    /// In this process, or on `qsweep worker` processes with --redis.
    Local,
    /// A Kubernetes Job of `qsweep worker` pods on the sweep's Redis queue.
    K8s,
}

#[derive(clap::Args)]
struct KubernetesArgs {
    /// Where the workers run.
    #[arg(long, value_enum, default_value_t = Backend::Local)]
    backend: Backend,
    /// With --backend k8s: print the Job as YAML and touch no cluster.
    #[arg(long)]
    dry_run: bool,
    /// Namespace of the worker Job.
    #[arg(long, default_value = "qsweep")]
    namespace: String,
    /// Worker image, with a tag or digest (k8s/Dockerfile builds it).
    #[arg(long, default_value = concat!("qsweep:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// Secret whose keys (REDIS_URL) become the workers' environment.
    #[arg(long, default_value = "qsweep-redis")]
    secret: String,
}

#[derive(clap::Args)]
struct OptionalRedis {
    /// Run on `qsweep worker` processes through this Redis instead of locally.
    #[arg(long = "redis")]
    url: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, default_value = "qsweep")]
    prefix: String,
    /// Share artifacts through an object store (s3://bucket/prefix, or
    /// file:///dir) instead of a results directory every worker sees.
    #[arg(long, requires = "url")]
    artifacts: Option<String>,
}

/// Exit code for usage, spec and set-up errors.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QSWEEP_LOG").unwrap_or_else(|_| "warn,ort=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { USAGE } else { 0 });
        }
    };
    match cli.command {
        Command::Validate { spec } => validate(&spec),
        Command::Plan { spec, json, results } => plan(&spec, json, results),
        Command::Run { spec, jobs, results, redis, kubernetes } => match kubernetes.backend {
            Backend::Local => run(&spec, jobs as usize, results, redis),
            Backend::K8s => kubernetes_job(&spec, results, &redis.prefix, &kubernetes),
        },
        Command::Worker { redis, concurrency, lease_secs, exit_when_idle, cache } => {
            let options = qsweep::redis_queue::consumer::WorkerOptions {
                url: redis.url,
                prefix: redis.prefix,
                concurrency: concurrency as usize,
                lease: std::time::Duration::from_secs(lease_secs),
                exit_when_idle,
                cache,
            };
            work(options)
        }
        Command::Status { sweep, redis } => status(&sweep, &redis),
        Command::Cancel { sweep, redis } => cancel(&sweep, &redis),
        Command::Report { dir } => regenerate_reports(&dir),
        Command::Schema => {
            print!("{}", spec::schema_text());
            ExitCode::SUCCESS
        }
    }
}

/// Loads a sweep, or prints its errors and says to exit 2.
fn load(spec: &Path) -> Result<sweep::Sweep, ExitCode> {
    sweep::load(spec).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(USAGE)
    })
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(USAGE)
}

fn validate(spec: &Path) -> ExitCode {
    match load(spec) {
        Ok(sweep) => {
            let ids: Vec<&str> = sweep.runs.iter().map(|r| r.id.as_str()).collect();
            println!("{} is valid: {} run(s): {}", spec.display(), ids.len(), ids.join(", "));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// A checked sweep and its plan, or the exit code after saying why not.
fn load_and_plan(spec: &Path) -> Result<(sweep::Sweep, Plan), ExitCode> {
    let sweep = load(spec)?;
    let sources = sweep.sources().map_err(|e| fail(format!("cannot fingerprint the model and data: {e}")))?;
    let plan = Plan::build(&sweep.spec, &sweep.runs, &sources);
    Ok((sweep, plan))
}

fn plan(spec: &Path, json: bool, results: Option<PathBuf>) -> ExitCode {
    let (sweep, plan) = match load_and_plan(spec) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let results = ResultsDir::open(&results.unwrap_or_else(|| sweep.default_results_dir()));
    let cached = |key| results.verified(key).is_some();
    let counts = plan.run_counts();
    if json {
        let tasks: Vec<serde_json::Value> = plan
            .tasks
            .iter()
            .map(|t| {
                serde_json::json!({
                    "key": t.key, "stage": t.stage, "params": t.params, "inputs": t.inputs,
                    "runs": counts.get(&t.key).copied().unwrap_or(0), "cached": cached(&t.key),
                })
            })
            .collect();
        let runs: Vec<serde_json::Value> = plan
            .runs
            .iter()
            .map(|r| serde_json::json!({"id": r.run.id, "kind": r.run.kind, "tasks": r.tasks}))
            .collect();
        let out = serde_json::json!({"sweep": plan.sweep, "sources": plan.sources, "runs": runs, "tasks": tasks});
        println!("{}", serde_json::to_string_pretty(&out).expect("a plan serializes"));
        return ExitCode::SUCCESS;
    }
    println!("sweep {}: {} run(s), {} distinct task(s)\n", plan.sweep, plan.runs.len(), plan.tasks.len());
    for run in &plan.runs {
        println!("{}", run.run.id);
        for key in &run.tasks {
            let task = plan.task(key).expect("a run's tasks are in the plan");
            let shared = counts[key];
            println!(
                "  {:<13} {}  {}{}",
                task.stage.name(),
                key.short(),
                if cached(key) { "cached" } else { "to run" },
                if shared > 1 { format!(", shared by {shared} runs") } else { String::new() }
            );
        }
    }
    let to_run = plan.tasks.iter().filter(|t| !cached(&t.key)).count();
    println!("\n{to_run} task(s) to run, {} cached", plan.tasks.len() - to_run);
    ExitCode::SUCCESS
}

fn run(spec: &Path, jobs: usize, results: Option<PathBuf>, redis: OptionalRedis) -> ExitCode {
    let (sweep, plan) = match load_and_plan(spec) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    // A missing library or GPU provider is a set-up error: say so before
    // any work, rather than fail every build.
    let provider = engine::Provider::for_engine(sweep.spec.evaluate.engine, false, Path::new("."));
    if let Err(e) = engine::runtime().and_then(|_| provider.check_available()) {
        return fail(e);
    }
    let dir = results.unwrap_or_else(|| sweep.default_results_dir());
    let results = match ResultsDir::create(&dir) {
        Ok(results) => results,
        Err(e) => {
            return fail(format!(
                "cannot write results to {}: {e}\n  fix: choose a writable directory with --results DIR",
                dir.display()
            ))
        }
    };
    if let Err(e) = results.remove_abandoned_staging().and_then(|_| results.save_plan(&plan)) {
        return fail(format!("cannot write to {}: {e}", dir.display()));
    }

    let store = match redis.artifacts.as_deref().map(ObjectArtifacts::open).transpose() {
        Ok(store) => store,
        Err(e) => return fail(e),
    };
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime starts");
    let interrupt = Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    let coordinated = tokio.block_on(async {
        match redis.url {
            None => {
                let mut queue = MemoryQueue::new(Arc::new(sweep), results.clone(), jobs);
                coordinator::run(&plan, &results, &mut queue, interrupt).await
            }
            Some(url) => {
                let connection = redis_queue::connection::connect(&url).await?;
                let keys = redis_queue::Keys::new(&redis.prefix);
                let mut queue =
                    RedisQueue::publish(connection, keys, &sweep, &plan, &results, redis.artifacts.as_deref()).await?;
                let summary = coordinator::run(&plan, &results, &mut queue, interrupt).await?;
                if let Some(store) = &store {
                    // The reports read manifests; the files stay in the store.
                    for task in &plan.tasks {
                        store
                            .fetch_manifest(&results, &task.key)
                            .await
                            .map_err(|e| QueueError::State(e.to_string()))?;
                    }
                }
                Ok(summary)
            }
        }
    });
    let summary = match coordinated {
        Ok(summary) => summary,
        Err(e) => return fail(e),
    };
    let reported = report::write_all(&results);
    match &reported {
        Ok(runs) => report::print_table(runs, &dir),
        Err(e) => eprintln!("error: cannot write the reports to {}: {e}", dir.display()),
    }
    eprintln!("{} task(s) executed, {} reused from earlier runs", summary.executed_tasks, summary.cached_tasks);
    if summary.interrupted {
        eprintln!("interrupted; `qsweep run {}` resumes where this stopped", spec.display());
        ExitCode::from(130)
    } else if summary.counts.failed > 0 || reported.is_err() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `--backend k8s`: prints the worker Job. Creating and watching it
/// through the Kubernetes API is not in this build.
fn kubernetes_job(spec: &Path, results: Option<PathBuf>, prefix: &str, args: &KubernetesArgs) -> ExitCode {
    if !args.dry_run {
        return fail(
            "this build of qsweep cannot yet create and watch the Job through the Kubernetes API\n  \
             fix: print it with --dry-run, `kubectl apply -f` it, and run `qsweep run SPEC --redis URL` as the coordinator",
        );
    }
    let (sweep, plan) = match load_and_plan(spec) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let results = ResultsDir::open(&results.unwrap_or_else(|| sweep.default_results_dir()));
    let pending = plan.tasks.iter().filter(|t| results.verified(&t.key).is_none()).count();
    let options = qsweep::k8s::JobOptions {
        namespace: args.namespace.clone(),
        image: args.image.clone(),
        secret: args.secret.clone(),
        prefix: prefix.to_string(),
    };
    match qsweep::k8s::worker_job(&sweep.spec.name, sweep.spec.resources.as_ref(), pending, &options) {
        Ok(job) => {
            print!("{}", qsweep::k8s::to_yaml(&job));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn work(options: redis_queue::consumer::WorkerOptions) -> ExitCode {
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime starts");
    let result = tokio.block_on(async {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = stop.send(true);
        });
        redis_queue::consumer::run(options, shutdown).await
    });
    match result {
        Ok(summary) => {
            eprintln!("worker done: {} task(s) executed, {} skipped", summary.executed, summary.skipped);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn status(sweep: &str, redis: &RedisArgs) -> ExitCode {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
    match tokio.block_on(redis_queue::queue::status(&redis.url, &redis_queue::Keys::new(&redis.prefix), sweep)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn cancel(sweep: &str, redis: &RedisArgs) -> ExitCode {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
    match tokio.block_on(redis_queue::queue::cancel(&redis.url, &redis_queue::Keys::new(&redis.prefix), sweep)) {
        Ok(()) => {
            println!("sweep {sweep} cancelled: its coordinator stops and workers drop its queued tasks");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn regenerate_reports(dir: &Path) -> ExitCode {
    let results = ResultsDir::open(dir);
    match report::write_all(&results) {
        Ok(runs) => {
            report::print_table(&runs, dir);
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!(
            "cannot report on {}: {e}\n  fix: pass a directory that `qsweep run` wrote (it holds plan.json)",
            dir.display()
        )),
    }
}
