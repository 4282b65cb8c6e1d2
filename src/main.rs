//! The `qsweep` command line: parses flags, calls the library, and maps
//! outcomes to exit codes (0 all runs ok, 1 some runs failed, 2 usage,
//! spec or set-up errors, 130 interrupted).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use qsweep::k8s::backend::ClusterOptions;
use qsweep::k8s::cluster::Cluster;
use qsweep::plan::Plan;
use qsweep::queue::QueueError;
use qsweep::shutdown::Signal;
use qsweep::store::ResultsDir;
use qsweep::{launch, redis_queue, report, spec, sweep};

#[derive(Parser)]
#[command(name = "qsweep", version, about = "Runs int8 quantization experiment sweeps on CNN models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a starter spec for a model and its data, validated, and says
    /// what was guessed.
    Init {
        /// The fp32 ONNX model.
        #[arg(long)]
        model: PathBuf,
        /// Evaluation data: an image folder (one subfolder per class) or a
        /// tensor file (.npy, .npz, .pt, or a folder of .pt).
        #[arg(long)]
        data: PathBuf,
        /// Calibration data, as --data [default: the evaluation data].
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Where to write the spec.
        #[arg(long, default_value = "qsweep.json")]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
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
        /// With --exit-when-idle: stay while this sweep's coordinator still
        /// has tasks to queue (what a sweep's Kubernetes Job passes).
        #[arg(long, requires = "exit_when_idle")]
        sweep: Option<String>,
        /// Seconds running stages get to finish after SIGTERM, SIGINT or
        /// SIGHUP before their tasks are handed back to the queue (below
        /// Kubernetes' default 30 s grace period).
        #[arg(long, default_value_t = qsweep::k8s::DRAIN_SECS, value_parser = clap::value_parser!(u64).range(0..=3600))]
        drain_secs: u64,
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
        /// Also delete the sweep's Kubernetes Jobs (and their pods) in this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// The kubeconfig context to use [default: the current one].
        #[arg(long, requires = "namespace")]
        context: Option<String>,
    },
    /// Trains an fp32 model on the dataset: a ResNet qsweep writes itself
    /// (resnet-8/20/32 style), or any ONNX model given with --from.
    Train {
        /// Where to write the trained ONNX model.
        #[arg(long)]
        out: PathBuf,
        /// Start from this ONNX model instead of a fresh ResNet.
        #[arg(long)]
        from: Option<PathBuf>,
        #[command(flatten)]
        recipe: spec::TrainSpec,
        /// fashion-mnist or mnist.
        #[arg(long, default_value = "fashion-mnist")]
        dataset: String,
        /// Directory of the dataset's IDX files [default: where Debian installs them].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Normalization: x = (pixel / 255 - mean) / std.
        #[arg(long, default_value_t = 0.2860)]
        mean: f32,
        #[arg(long, default_value_t = 0.3530)]
        std: f32,
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
    /// The kubeconfig context to use [default: the current one].
    #[arg(long)]
    context: Option<String>,
    /// Seconds a worker pod may wait for a node before the scheduler's
    /// message is shown (progress and `qsweep status`).
    #[arg(long, default_value_t = 60)]
    unschedulable_after: u64,
}

#[derive(clap::Args)]
struct OptionalRedis {
    /// Run on `qsweep worker` processes through this Redis instead of
    /// locally; `--redis` alone takes the URL from REDIS_URL, which keeps a
    /// password out of `ps`.
    #[arg(long = "redis", num_args = 0..=1, default_missing_value = "", value_name = "URL")]
    url: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, default_value = "qsweep")]
    prefix: String,
    /// Share artifacts through an object store (s3://bucket/prefix, or
    /// file:///dir) instead of a results directory every worker sees.
    #[arg(long, requires = "url")]
    artifacts: Option<String>,
}

impl OptionalRedis {
    /// The Redis URL this run uses: `--redis URL`; `--redis` alone or
    /// `--backend k8s`, REDIS_URL. A REDIS_URL set while the run would be
    /// local is refused rather than ignored, since whoever set it most
    /// likely meant the sweep to go through it.
    fn take_url(&mut self, backend: Backend) -> Result<Option<String>, String> {
        let from_env = std::env::var("REDIS_URL").ok().filter(|url| !url.is_empty());
        match (self.url.take(), from_env, backend) {
            (Some(url), _, _) if !url.is_empty() => Ok(Some(url)),
            (Some(_), Some(url), _) | (None, Some(url), Backend::K8s) => Ok(Some(url)),
            (Some(_), None, _) => Err("--redis without a URL reads REDIS_URL, which is not set\n  \
                 fix: export REDIS_URL=redis://[user:password@]host:port, or give --redis URL"
                .into()),
            (None, Some(_), Backend::Local) => Err("REDIS_URL is set, but without --redis this sweep would run locally\n  \
                 fix: add --redis to run on `qsweep worker` processes through REDIS_URL, or unset REDIS_URL to run here"
                .into()),
            (None, None, _) => Ok(None),
        }
    }
}

/// Exit code for usage, spec and set-up errors.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    // Two TLS stacks are linked (ring through redis and kube, aws-lc-rs
    // through object_store); the Kubernetes client needs one chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
        Command::Init { model, data, calibration, out, force } => init(
            &qsweep::init::Request { model: &model, data: &data, calibration: calibration.as_deref(), out: &out },
            force,
        ),
        Command::Validate { spec } => validate(&spec),
        Command::Plan { spec, json, results } => plan(&spec, json, results),
        Command::Run { spec, jobs, results, mut redis, kubernetes } => match redis.take_url(kubernetes.backend) {
            Err(message) => fail(&message),
            Ok(url) => {
                redis.url = url;
                match kubernetes.backend {
                    Backend::Local => run(&spec, jobs as usize, results, redis, None),
                    Backend::K8s if kubernetes.dry_run => kubernetes_job(&spec, results, &redis.prefix, &kubernetes),
                    Backend::K8s if redis.url.is_none() => fail(
                        "--backend k8s needs a Redis URL (--redis URL, or REDIS_URL): the coordinator's way to the Redis that the pods reach through the Secret's REDIS_URL\n  \
                         fix: export REDIS_URL=redis://... (with kubectl port-forward if Redis runs in the cluster), or print the Job with --dry-run",
                    ),
                    Backend::K8s => run(&spec, jobs as usize, results, redis, Some(kubernetes)),
                }
            }
        },
        Command::Worker { redis, concurrency, lease_secs, exit_when_idle, cache, sweep, drain_secs } => {
            let options = qsweep::redis_queue::consumer::WorkerOptions {
                url: redis.url,
                prefix: redis.prefix,
                concurrency: concurrency as usize,
                lease: std::time::Duration::from_secs(lease_secs),
                exit_when_idle,
                cache,
                sweep,
                drain: std::time::Duration::from_secs(drain_secs),
            };
            work(options)
        }
        Command::Status { sweep, redis } => status(&sweep, &redis),
        Command::Cancel { sweep, redis, namespace, context } => cancel(&sweep, &redis, namespace, context),
        Command::Report { dir } => regenerate_reports(&dir),
        Command::Train { out, from, recipe, dataset, data_dir, mean, std } => train(&qsweep::train::command::Request {
            out: &out,
            from: from.as_deref(),
            spec: &recipe,
            dataset: &dataset,
            data_dir,
            mean,
            std,
        }),
        Command::Schema => {
            print!("{}", spec::schema_text());
            ExitCode::SUCCESS
        }
    }
}

/// Loads a sweep, or prints its errors and says to exit 2.
fn load(spec: &Path) -> Result<sweep::Sweep, ExitCode> {
    let sweep = sweep::load(spec).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(USAGE)
    })?;
    for note in &sweep.notes {
        eprintln!("note: {note}");
    }
    Ok(sweep)
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(USAGE)
}

fn init(request: &qsweep::init::Request<'_>, force: bool) -> ExitCode {
    if request.out.exists() && !force {
        return fail(format!(
            "{} exists\n  fix: pass --force to replace it, or choose another --out",
            request.out.display()
        ));
    }
    let starter = match qsweep::init::starter(request) {
        Ok(starter) => starter,
        Err(message) => return fail(message),
    };
    // Validated as `qsweep run` would read it, before anything is written.
    if let Err(errors) = sweep::load_text(request.out, starter.spec.clone()) {
        eprint!("{errors}");
        eprintln!("error: the starter spec does not validate against this model and data, so nothing was written");
        return ExitCode::from(USAGE);
    }
    if let Err(e) = std::fs::write(request.out, &starter.spec) {
        return fail(format!("cannot write {}: {e}", request.out.display()));
    }
    println!("wrote {}", request.out.display());
    for line in &starter.found {
        println!("  read  {line}");
    }
    println!("check these guesses before trusting the numbers:");
    for line in &starter.check {
        println!("  - {line}");
    }
    println!("then: qsweep plan {0}   and   qsweep run {0}", request.out.display());
    ExitCode::SUCCESS
}

fn validate(spec: &Path) -> ExitCode {
    match load(spec) {
        Ok(sweep) => {
            let ids: Vec<&str> = sweep.runs.iter().map(|r| r.id.as_str()).collect();
            println!("{} is valid: {} run(s): {}", spec.display(), ids.len(), ids.join(", "));
            // Specs are often checked away from the machines that run them,
            // so an engine this machine cannot run is a warning here; `run`
            // refuses it.
            if let Err(e) = qsweep::engine::check_engine(sweep.spec.evaluate.engine) {
                eprintln!("warning: `qsweep run` on this machine would refuse this spec: {e}");
                eprintln!("  (fine if it runs elsewhere, e.g. with --backend k8s on GPU nodes)");
            }
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
    let cached_tasks = results.cached_tasks(&plan);
    let cached = |key| cached_tasks.contains(key);
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

fn run(
    spec: &Path,
    jobs: usize,
    results: Option<PathBuf>,
    redis: OptionalRedis,
    kubernetes: Option<KubernetesArgs>,
) -> ExitCode {
    let (sweep, plan) = match load_and_plan(spec) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let target = match redis.url {
        None => launch::Target::Local { jobs },
        Some(url) => {
            let cluster = match &kubernetes {
                Some(args) => match cluster_options(&sweep, &redis.prefix, args) {
                    Ok(options) => Some(launch::ClusterTarget {
                        context: args.context.clone(),
                        namespace: args.namespace.clone(),
                        options,
                    }),
                    Err(code) => return code,
                },
                None => None,
            };
            launch::Target::Redis { url, prefix: redis.prefix, artifacts: redis.artifacts, cluster }
        }
    };
    let dir = results.unwrap_or_else(|| sweep.default_results_dir());
    let command = format!("qsweep run {}", spec.display());
    let outcome = match launch::run(launch::Launch { sweep, plan, results: dir.clone(), command, target }) {
        Ok(outcome) => outcome,
        Err(e) => return fail(e),
    };
    if let Some(warning) = &outcome.cleanup_warning {
        eprintln!("warning: {warning}");
    }
    let summary = &outcome.summary;
    match &outcome.reported {
        Ok(runs) => report::print_table(runs, &dir),
        Err(e) => eprintln!("error: cannot write the reports to {}: {e}", dir.display()),
    }
    eprintln!("{} task(s) executed, {} reused from earlier runs", summary.executed_tasks, summary.cached_tasks);
    if summary.interrupted {
        let (how, code) = match outcome.signal {
            Some(signal) => (format!("stopped by {}", signal.name()), signal.exit_code()),
            None => ("cancelled".to_string(), Signal::Interrupt.exit_code()),
        };
        eprintln!("{how}; `qsweep run {}` resumes where this stopped", spec.display());
        ExitCode::from(code)
    } else if summary.counts.failed > 0 || outcome.reported.is_err() {
        ExitCode::FAILURE
    } else if summary.counts.remaining > 0 {
        eprintln!("error: {} run(s) have no result; rerun to finish them", summary.counts.remaining);
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The pods' side of a k8s run, checked before anything is written.
fn cluster_options(sweep: &sweep::Sweep, prefix: &str, args: &KubernetesArgs) -> Result<ClusterOptions, ExitCode> {
    let job = job_options(prefix, args);
    // Building the Job checks the image and the resources.
    qsweep::k8s::worker_job(&sweep.spec.name, sweep.spec.resources.as_ref(), 1, &job, 1).map_err(fail)?;
    Ok(ClusterOptions {
        job,
        resources: sweep.spec.resources.clone().expect("worker_job checked the resources"),
        retries: sweep.spec.retries,
        unschedulable_after: std::time::Duration::from_secs(args.unschedulable_after),
    })
}

fn job_options(prefix: &str, args: &KubernetesArgs) -> qsweep::k8s::JobOptions {
    qsweep::k8s::JobOptions {
        namespace: args.namespace.clone(),
        image: args.image.clone(),
        secret: args.secret.clone(),
        prefix: prefix.to_string(),
    }
}

/// `--backend k8s --dry-run`: prints the worker Job and touches no cluster.
fn kubernetes_job(spec: &Path, results: Option<PathBuf>, prefix: &str, args: &KubernetesArgs) -> ExitCode {
    let (sweep, plan) = match load_and_plan(spec) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let results = ResultsDir::open(&results.unwrap_or_else(|| sweep.default_results_dir()));
    let pending = plan.tasks.len() - results.cached_tasks(&plan).len();
    let options = job_options(prefix, args);
    match qsweep::k8s::worker_job(&sweep.spec.name, sweep.spec.resources.as_ref(), pending, &options, 1) {
        Ok(job) => {
            print!("{}", qsweep::k8s::to_yaml(&job));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn work(options: redis_queue::consumer::WorkerOptions) -> ExitCode {
    match redis_queue::consumer::run_until_stopped(options) {
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

fn cancel(sweep: &str, redis: &RedisArgs, namespace: Option<String>, context: Option<String>) -> ExitCode {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
    let cancelled = tokio.block_on(async {
        redis_queue::queue::cancel(&redis.url, &redis_queue::Keys::new(&redis.prefix), sweep).await?;
        println!("sweep {sweep} cancelled: its coordinator stops and workers drop its queued tasks");
        if let Some(namespace) = namespace {
            let cluster = Cluster::connect(context.as_deref(), &namespace).await?;
            let deleted = cluster.delete_sweep_jobs(sweep).await?;
            match deleted.len() {
                0 => println!("no Job of sweep {sweep} in namespace {namespace}"),
                _ => println!("deleted Job(s) {} and their pods (foreground propagation)", deleted.join(", ")),
            }
        }
        Ok::<_, QueueError>(())
    });
    match cancelled {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn train(request: &qsweep::train::command::Request<'_>) -> ExitCode {
    use qsweep::train::command::{self, Outcome};
    match command::run(request) {
        Ok(Outcome::Written(line)) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Stopped { signal, checkpoint }) => {
            eprintln!(
                "stopped by {}; the same command resumes from the last finished epoch ({})",
                signal.name(),
                checkpoint.display()
            );
            ExitCode::from(signal.exit_code())
        }
        Err(message) => fail(message),
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
