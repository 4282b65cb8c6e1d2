//! What a sweep shows while it works: on a terminal, a live display (one
//! bar for the sweep with an ETA, one line per worker slot); otherwise, one
//! plain log line per event, so CI logs and `| tee` stay readable.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::plan::{Plan, TaskKey};

pub struct Progress {
    display: Option<Live>,
    /// Remote workers alive, shown beside the run counts (None locally).
    workers: std::sync::Mutex<Option<usize>>,
    last_counts: std::sync::Mutex<RunCounts>,
    last_plain_progress: std::sync::Mutex<std::collections::HashMap<usize, std::time::Instant>>,
    /// Off a terminal: the run-count line last printed, and when.
    last_plain_runs: std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

/// How often plain (non-terminal) output repeats a task's progress.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How often plain output repeats run counts that have not changed, so a
/// long stage still shows the sweep is alive.
const PLAIN_RUNS_EVERY: Duration = Duration::from_secs(60);

struct Live {
    _multi: MultiProgress,
    overall: ProgressBar,
    slots: Vec<ProgressBar>,
}

/// Runs that have reached an end, and those still to go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub done: usize,
    pub failed: usize,
    pub remaining: usize,
}

/// Where a task stands, as far as counting runs goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    Done,
    Failed,
    Pending,
}

impl RunCounts {
    /// A run is failed if any of its tasks failed, done if all are done.
    pub fn tally(plan: &Plan, outcome: impl Fn(&TaskKey) -> TaskOutcome) -> Self {
        let mut counts = RunCounts::default();
        for run in &plan.runs {
            let outcomes: Vec<TaskOutcome> = run.tasks.iter().map(&outcome).collect();
            if outcomes.contains(&TaskOutcome::Failed) {
                counts.failed += 1;
            } else if outcomes.iter().all(|o| *o == TaskOutcome::Done) {
                counts.done += 1;
            } else {
                counts.remaining += 1;
            }
        }
        counts
    }
}

impl Progress {
    /// A live display when stderr is a terminal, plain lines otherwise.
    pub fn new(tasks_to_run: usize, slots: usize) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                display: None,
                workers: Default::default(),
                last_counts: Default::default(),
                last_plain_progress: Default::default(),
                last_plain_runs: Default::default(),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(tasks_to_run as u64));
        overall.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} tasks  {msg}  [{elapsed_precise}, ETA {eta}]")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        let slots = (0..slots)
            .map(|i| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(ProgressStyle::with_template("  {spinner} {prefix} {msg}").expect("a valid template"));
                bar.set_prefix(format!("worker {}", i + 1));
                bar.set_message("idle");
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            })
            .collect();
        Self {
            display: Some(Live { _multi: multi, overall, slots }),
            workers: Default::default(),
            last_counts: Default::default(),
            last_plain_progress: Default::default(),
            last_plain_runs: Default::default(),
        }
    }

    pub fn runs(&self, counts: RunCounts) {
        *self.last_counts.lock().expect("progress lock") = counts;
        let workers = match *self.workers.lock().expect("progress lock") {
            Some(alive) => format!(", {alive} worker(s) alive"),
            None => String::new(),
        };
        let text =
            format!("runs: {} done, {} failed, {} remaining{workers}", counts.done, counts.failed, counts.remaining);
        match &self.display {
            Some(live) => live.overall.set_message(text),
            None => {
                // Only when the counts change, or a minute on: the
                // coordinator reports them after every event.
                let mut last = self.last_plain_runs.lock().expect("progress lock");
                let due =
                    last.as_ref().is_none_or(|(printed, at)| *printed != text || at.elapsed() >= PLAIN_RUNS_EVERY);
                if due {
                    eprintln!("{text}");
                    *last = Some((text, std::time::Instant::now()));
                }
            }
        }
    }

    /// Remote workers' liveness changed: shown with the run counts.
    pub fn workers(&self, alive: usize) {
        *self.workers.lock().expect("progress lock") = Some(alive);
        let counts = *self.last_counts.lock().expect("progress lock");
        self.runs(counts);
    }

    /// How a long task on an in-process slot is getting on: the slot's
    /// line on a terminal; off a terminal, a log line at most every
    /// `PLAIN_PROGRESS_EVERY` per slot, so CI logs stay short.
    pub fn task_progress(&self, slot: usize, label: &str, text: &str) {
        match &self.display {
            Some(live) => {
                if let Some(line) = live.slots.get(slot) {
                    line.set_message(format!("{label}: {text}"));
                }
            }
            None => {
                let mut last = self.last_plain_progress.lock().expect("progress lock");
                let due = last.get(&slot).is_none_or(|at| at.elapsed() >= PLAIN_PROGRESS_EVERY);
                if due {
                    last.insert(slot, std::time::Instant::now());
                    eprintln!("{}{label}: {text}", worker_prefix(Some(slot)));
                }
            }
        }
    }

    pub fn started(&self, slot: usize, label: &str) {
        match &self.display {
            Some(live) => {
                if let Some(line) = live.slots.get(slot) {
                    line.set_message(label.to_string());
                }
            }
            None => eprintln!("{}start {label}", worker_prefix(Some(slot))),
        }
    }

    /// A task ended; `slot` is the in-process worker line that ran it, if any.
    pub fn finished(&self, slot: Option<usize>, label: &str, elapsed_s: f64) {
        self.ended(slot, format!("done   {label} in {elapsed_s:.1}s"));
    }

    pub fn failed(&self, slot: Option<usize>, label: &str, error: &str) {
        self.ended(slot, format!("FAILED {label}: {error}"));
    }

    fn ended(&self, slot: Option<usize>, text: String) {
        match &self.display {
            Some(live) => {
                live.overall.inc(1);
                if let Some(line) = slot.and_then(|s| live.slots.get(s)) {
                    line.set_message("idle");
                }
                live.overall.println(text);
            }
            None => eprintln!("{}{text}", worker_prefix(slot)),
        }
    }

    pub fn retrying(&self, slot: Option<usize>, label: &str, attempt: u32, error: &str) {
        let text = format!("retry  {label} after attempt {attempt} failed: {error}");
        match &self.display {
            Some(live) => live.overall.println(text),
            None => eprintln!("{}{text}", worker_prefix(slot)),
        }
    }

    /// A message that is not about one task.
    pub fn note(&self, text: &str) {
        match &self.display {
            Some(live) => live.overall.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(live) = &self.display {
            for slot in &live.slots {
                slot.finish_and_clear();
            }
            live.overall.finish();
        }
    }
}

/// "[worker 2] " for in-process workers' log lines.
fn worker_prefix(slot: Option<usize>) -> String {
    slot.map_or(String::new(), |s| format!("[worker {}] ", s + 1))
}

/// A stage's walk over a split, told as `done of total <unit>, N/s, ETA`:
/// the line its slot shows live (or in the log, every few seconds).
pub struct Walk<'a> {
    report: &'a (dyn Fn(&str) + Sync),
    unit: &'static str,
    total: usize,
    done: usize,
    started: std::time::Instant,
    last_report: Option<std::time::Instant>,
}

/// How often a walk's line is refreshed.
const WALK_EVERY: Duration = Duration::from_millis(500);

impl<'a> Walk<'a> {
    pub fn new(report: &'a (dyn Fn(&str) + Sync), unit: &'static str, total: usize) -> Self {
        Self { report, unit, total, done: 0, started: std::time::Instant::now(), last_report: None }
    }

    /// `count` more done; reports at most every half second, and at the end.
    pub fn advance(&mut self, count: usize) {
        self.done += count;
        let due = self.last_report.is_none_or(|at| at.elapsed() >= WALK_EVERY);
        if due || self.done >= self.total {
            self.last_report = Some(std::time::Instant::now());
            (self.report)(&self.describe());
        }
    }

    pub fn done(&self) -> usize {
        self.done
    }

    fn describe(&self) -> String {
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / seconds.max(1e-3);
        let left = self.total.saturating_sub(self.done) as f64 / rate.max(1e-9);
        let eta = if self.done == 0 {
            "?".to_string()
        } else {
            format!("{}", indicatif::HumanDuration(Duration::from_secs_f64(left)))
        };
        format!("{} of {} {}, {rate:.0}/s, ETA {eta}", self.done, self.total, self.unit)
    }
}
