//! Reports, regenerated from what the results directory holds: report.html,
//! runs.csv, runs.jsonl, summary.md, accuracy_latency.svg and the charts
//! of sensitivity, fallback searches and QAT validation. They read the stored
//! plan, manifests and failure records only, so `qsweep report DIR` gives
//! the same files as the end of `qsweep run`, and a half-finished sweep
//! reports what it has.

mod fallback;
mod health;
mod html;
mod plot;
mod qat;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::matrix::RunKind;
use crate::plan::{Plan, StageKind};
use crate::spec::FloatLayers;
use crate::store::{write_atomically, ResultsDir};

/// One row of runs.csv.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunRow {
    pub run: String,
    pub calibration: String,
    pub residual_fusion: String,
    pub qat_epochs: String,
    /// ok, failed, or pending (not run yet).
    pub status: String,
    /// Top-1 on the test split, in percent.
    pub accuracy: Option<f64>,
    /// Accuracy minus fp32's, in percentage points.
    pub accuracy_delta: Option<f64>,
    /// Top-5, in percent, where the model scores at least 5 classes.
    pub top5: Option<f64>,
    /// Evaluation samples without labels: the share, in percent, whose
    /// top-1 class is fp32's (in place of accuracy).
    pub agreement: Option<f64>,
    /// Evaluation samples without labels: the mean SQNR of the scores
    /// against fp32's, in dB.
    pub logit_sqnr_db: Option<f64>,
    /// At the smallest configured batch size (batch 1 by default).
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Images per second at the largest configured batch size.
    pub throughput: Option<f64>,
    pub model_bytes: Option<u64>,
    pub engine_bytes: Option<u64>,
    /// tensorrt or onnxruntime-cpu; empty for fp32.
    pub int8_format: String,
    pub qdq_pairs: Option<u64>,
    /// Share of Conv/Gemm/MatMul nodes the engine runs as int8 kernels.
    pub int8_kernel_share: Option<f64>,
    /// The same share weighted by multiply-adds.
    pub int8_flop_share: Option<f64>,
    /// Residual Adds whose shortcut stayed in float, `;`-separated.
    pub float_residual_adds: String,
    /// The matrix axis: 0, a count, or auto (after the columns older
    /// readers index by position).
    pub float_layers: String,
    /// The ops `float_layers` left in float, by name, `;`-separated.
    pub float_ops: String,
    /// `float_layers: "auto"`: whether validation top-1 came within the budget.
    pub budget_met: Option<bool>,
    /// `float_layers: "auto"`: top-1 on the validation subset the budget was judged on, in percent.
    pub validation_accuracy: Option<f64>,
    /// QAT's starting learning rate: the spec's, or the range test's pick.
    pub qat_learning_rate: Option<f64>,
    /// The QAT epoch whose model the run built (0: its PTQ start).
    pub qat_kept_epoch: Option<u32>,
    /// Training the fp32 model, when the sweep trains it (shared by every run).
    pub train_s: Option<f64>,
    pub prepare_data_s: Option<f64>,
    pub calibrate_s: Option<f64>,
    pub sensitivity_s: Option<f64>,
    pub fallback_s: Option<f64>,
    pub qat_s: Option<f64>,
    pub build_s: Option<f64>,
    pub evaluate_s: Option<f64>,
    pub error: String,
}

/// A run with everything recorded about it.
pub struct RunResult {
    pub row: RunRow,
    /// The evaluate stage's full metrics (every batch size, the machine).
    pub evaluation: Option<Value>,
}

/// Collects every run's results from a results directory.
pub fn collect(results: &ResultsDir, plan: &Plan) -> Vec<RunResult> {
    let mut out: Vec<RunResult> = plan
        .runs
        .iter()
        .map(|planned| {
            let (calibration, residual_fusion, qat_epochs, float_layers) = match &planned.run.kind {
                RunKind::Baseline(_) => Default::default(),
                RunKind::Quantized(r) => (
                    r.calibration.name().to_string(),
                    r.residual_fusion.to_string(),
                    r.qat_epochs.to_string(),
                    match r.float_layers {
                        FloatLayers::Count(k) => k.to_string(),
                        FloatLayers::Auto(_) => "auto".to_string(),
                    },
                ),
            };
            let mut row = RunRow {
                run: planned.run.id.clone(),
                calibration,
                residual_fusion,
                qat_epochs,
                float_layers,
                status: "pending".into(),
                ..Default::default()
            };
            let mut evaluation = None;
            let mut complete = true;
            for key in &planned.tasks {
                let stage = plan.task(key).map(|t| t.stage);
                match results.manifest(key) {
                    Some(manifest) => {
                        let timing = match manifest.stage {
                            StageKind::Train => &mut row.train_s,
                            StageKind::PrepareData => &mut row.prepare_data_s,
                            StageKind::Calibrate => &mut row.calibrate_s,
                            StageKind::Sensitivity => &mut row.sensitivity_s,
                            StageKind::Fallback => &mut row.fallback_s,
                            StageKind::LearningRate | StageKind::Qat => &mut row.qat_s,
                            StageKind::Build => &mut row.build_s,
                            StageKind::Evaluate | StageKind::Noop => &mut row.evaluate_s,
                        };
                        *timing = Some(timing.unwrap_or(0.0) + manifest.elapsed_s);
                        match manifest.stage {
                            StageKind::Build => fill_from_build(&mut row, &manifest.metrics),
                            StageKind::Evaluate => evaluation = Some(manifest.metrics),
                            StageKind::Qat => {
                                row.qat_learning_rate = manifest.metrics["learning_rate"].as_f64();
                                row.qat_kept_epoch = manifest.metrics["kept_epoch"].as_u64().map(|e| e as u32);
                            }
                            StageKind::Fallback => {
                                row.budget_met = manifest.metrics["budget_met"].as_bool();
                                row.validation_accuracy = manifest.metrics["validation_top1"].as_f64();
                            }
                            _ => {}
                        }
                    }
                    None => {
                        complete = false;
                        if let Some(failure) = results.failure(key) {
                            row.status = "failed".into();
                            if row.error.is_empty() {
                                let stage = stage.map_or("a stage".to_string(), |s| s.to_string());
                                row.error =
                                    format!("{stage} failed after {} attempt(s): {}", failure.attempts, failure.error);
                            }
                        }
                    }
                }
            }
            if let Some(metrics) = evaluation.as_ref().filter(|_| complete) {
                row.status = "ok".into();
                row.accuracy = metrics["accuracy"].as_f64().map(|a| a * 100.0);
                row.top5 = metrics["top5"].as_f64().map(|a| a * 100.0);
                row.agreement = metrics["agreement"].as_f64().map(|a| a * 100.0);
                row.logit_sqnr_db = metrics["logit_sqnr_db"].as_f64();
                let latency = metrics["latency"].as_array().cloned().unwrap_or_default();
                let smallest = latency.iter().min_by_key(|l| l["batch"].as_u64());
                let largest = latency.iter().max_by_key(|l| l["batch"].as_u64());
                row.latency_p50_ms = smallest.and_then(|l| l["p50_ms"].as_f64());
                row.latency_p99_ms = smallest.and_then(|l| l["p99_ms"].as_f64());
                row.throughput = largest.and_then(|l| l["throughput"].as_f64());
            }
            RunResult { row, evaluation }
        })
        .collect();

    let fp32 = out.iter().find(|r| r.row.run == "fp32").and_then(|r| r.row.accuracy);
    for result in &mut out {
        // Rounded to what the test split can resolve (0.01 points = 1 image).
        result.row.accuracy_delta = result.row.accuracy.zip(fp32).map(|(a, base)| ((a - base) * 100.0).round() / 100.0);
    }
    out
}

impl RunRow {
    /// What the run is ranked by: top-1 accuracy, or with unlabelled
    /// samples the agreement with fp32.
    pub fn quality(&self) -> Option<f64> {
        self.accuracy.or(self.agreement)
    }
}

/// What [`RunRow::quality`] is in these runs, as its runs.csv column and
/// as an axis label.
fn quality_measure(runs: &[RunResult]) -> (&'static str, &'static str) {
    if runs.iter().any(|r| r.row.accuracy.is_some()) {
        ("accuracy", "top-1 accuracy (%)")
    } else {
        ("agreement", "top-1 agreement with fp32 (%)")
    }
}

/// Model sizes and int8 coverage, from a build stage's metrics.
fn fill_from_build(row: &mut RunRow, metrics: &Value) {
    row.model_bytes = metrics["model_bytes"].as_u64();
    row.engine_bytes = metrics["engine_bytes"].as_u64();
    row.int8_format = metrics["format"].as_str().unwrap_or_default().to_string();
    row.qdq_pairs = metrics["qdq_pairs"].as_u64();
    if row.int8_format.is_empty() {
        return;
    }
    row.int8_kernel_share = metrics["coverage"]["int8_share"].as_f64();
    row.int8_flop_share = metrics["coverage"]["int8_flop_share"].as_f64();
    // Counted on the optimized engine where qsweep can read it (CPU
    // builds); a GPU provider's engine is its own, so there the Q/DQ
    // graph's count stands in.
    let counted = match metrics["coverage"]["float_residual_adds"].as_array() {
        Some(on_engine) => on_engine,
        None => metrics["float_residual_adds"].as_array().map(Vec::as_slice).unwrap_or_default(),
    };
    let float_adds: Vec<&str> = counted.iter().filter_map(|a| a.as_str()).collect();
    row.float_residual_adds = float_adds.join(";");
    let float_ops = metrics["float_ops"].as_array().map(Vec::as_slice).unwrap_or_default();
    row.float_ops = float_ops.iter().filter_map(|op| op.as_str()).collect::<Vec<_>>().join(";");
}

/// Writes every report into the results directory.
pub fn write_all(results: &ResultsDir) -> std::io::Result<Vec<RunResult>> {
    let plan = results.load_plan()?;
    let runs = collect(results, &plan);
    let root = results.root();
    write_atomically(&root.join("runs.csv"), &runs_csv(&runs)?)?;
    write_atomically(&root.join("runs.jsonl"), runs_jsonl(&runs).as_bytes())?;
    let findings = fallback::Findings::collect(results, &plan);
    let mut summary = summary_markdown(&plan.sweep, &runs);
    summary.push_str(&findings.markdown(&runs));
    let qat = qat::QatFindings::collect(results, &plan);
    summary.push_str(&qat.markdown(&runs));
    let (calibrations, percentile_recorded) = health::assess_all(results, &plan);
    summary.push_str(&health::section(&calibrations, percentile_recorded));
    write_atomically(&root.join("summary.md"), summary.as_bytes())?;
    write_atomically(
        &root.join("accuracy_latency.svg"),
        plot::accuracy_latency_svg(&plan.sweep, &runs, findings.budget()).as_bytes(),
    )?;
    for (name, svg) in findings.charts() {
        write_atomically(&root.join(name), svg.as_bytes())?;
    }
    if let Some(svg) = qat.chart() {
        write_atomically(&root.join(qat::CHART), svg.as_bytes())?;
    }
    let inputs =
        html::Inputs { results, plan: &plan, runs: &runs, findings: &findings, calibrations: &calibrations, qat: &qat };
    write_atomically(&root.join("report.html"), html::page(&inputs).as_bytes())?;
    Ok(runs)
}

fn runs_csv(runs: &[RunResult]) -> std::io::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for run in runs {
        writer.serialize(&run.row).map_err(std::io::Error::other)?;
    }
    writer.into_inner().map_err(|e| std::io::Error::other(e.to_string()))
}

fn runs_jsonl(runs: &[RunResult]) -> String {
    let mut out = String::new();
    for run in runs {
        let mut value = serde_json::to_value(&run.row).expect("a row serializes");
        value["evaluation"] = run.evaluation.clone().unwrap_or(Value::Null);
        out.push_str(&value.to_string());
        out.push('\n');
    }
    out
}

fn summary_markdown(sweep: &str, runs: &[RunResult]) -> String {
    let mut md = format!("# Sweep `{sweep}`\n\n");
    let fp32 = runs.iter().find(|r| r.row.run == "fp32" && r.row.status == "ok");
    if let Some(evaluation) = runs.iter().find_map(|r| r.evaluation.as_ref()) {
        let batches: Vec<String> = evaluation["latency"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["batch"].as_u64().map(|b| b.to_string()))
            .collect();
        let measure = if evaluation["labelled"] == false {
            "The evaluation samples have no labels, so in place of accuracy each run shows the share of samples \
             whose top-1 class is fp32's (agreement) and the mean SQNR of its scores against fp32's, on"
        } else {
            "Accuracy is top-1 on"
        };
        let fixed = match evaluation["fixed_batch"].as_u64() {
            Some(batch) => {
                format!(" The model's batch axis is fixed at {batch}, so it is measured at that batch only.")
            }
            None => String::new(),
        };
        let _ = writeln!(
            md,
            "Measured with ONNX Runtime {} ({} execution provider, {} threads) on {} ({} cores). \
             {measure} {} test images; latency is p50 at batch {}; throughput is at batch {}.{fixed}\n",
            evaluation["onnxruntime"].as_str().unwrap_or("?"),
            evaluation["engine"].as_str().unwrap_or("?"),
            evaluation["threads"],
            evaluation["machine"]["cpu"].as_str().unwrap_or("?"),
            evaluation["machine"]["cores"],
            evaluation["test_images"],
            batches.first().map_or("?", String::as_str),
            batches.last().map_or("?", String::as_str),
        );
    }

    md.push_str("| Model | Accuracy | Performance | Note |\n|---|---|---|---|\n");
    for run in runs {
        let r = &run.row;
        let top5 = r.top5.map_or(String::new(), |t| format!("; top-5 {t:.2}%"));
        let accuracy = match (r.accuracy, r.accuracy_delta, r.agreement) {
            (Some(a), Some(d), _) if r.run != "fp32" => format!("{a:.2}% ({d:+.2}){top5}"),
            (Some(a), _, _) => format!("{a:.2}%{top5}"),
            (None, _, Some(agreement)) => match r.logit_sqnr_db {
                Some(sqnr) => format!("agreement {agreement:.2}%; SQNR {sqnr:.1} dB"),
                None => "reference".to_string(),
            },
            _ => "-".to_string(),
        };
        let performance = match (r.latency_p50_ms, r.throughput) {
            (Some(p50), Some(tput)) => {
                let speedup = fp32
                    .and_then(|f| f.row.latency_p50_ms)
                    .filter(|_| r.run != "fp32")
                    .map_or(String::new(), |base| format!(", {:.2}x fp32", base / p50));
                format!("{p50:.3} ms{speedup}; {tput:.0} img/s")
            }
            _ => "-".to_string(),
        };
        let note = match r.status.as_str() {
            "ok" if r.run == "fp32" => "baseline".to_string(),
            "ok" => describe(r),
            "failed" => format!("failed: {}", first_line(&r.error)),
            other => other.to_string(),
        };
        let _ = writeln!(md, "| {} | {accuracy} | {performance} | {note} |", r.run);
    }

    pivots(&mut md, runs);

    if let Some(r) = best_run(runs) {
        let _ = writeln!(
            md,
            "\n## Best run\n\n`{}`: {:.2}% {}{}, {:.3} ms p50.",
            r.run,
            r.quality().unwrap_or(0.0),
            if r.accuracy.is_some() { "top-1" } else { "agreement with fp32" },
            r.accuracy_delta
                .filter(|_| r.run != "fp32")
                .map_or(String::new(), |d| format!(" ({d:+.2} points against fp32)")),
            r.latency_p50_ms.unwrap_or(0.0),
        );
    }

    let unfinished: Vec<&RunRow> = runs.iter().map(|r| &r.row).filter(|r| r.status != "ok").collect();
    if !unfinished.is_empty() {
        md.push_str("\n## Runs without results\n\n");
        for r in unfinished {
            let _ = writeln!(md, "- `{}`: {}", r.run, if r.error.is_empty() { &r.status } else { &r.error });
        }
    }
    md.push_str("\n![accuracy against latency](accuracy_latency.svg)\n");
    md
}

/// The most accurate finished run, the faster of equals: what the report
/// marks when the sweep sets no accuracy budget to recommend against.
fn best_run(runs: &[RunResult]) -> Option<&RunRow> {
    let finished = runs.iter().map(|r| &r.row).filter(|r| r.status == "ok");
    finished.max_by(|a, b| {
        let key = |r: &RunRow| (r.quality().unwrap_or(0.0), -r.latency_p50_ms.unwrap_or(f64::MAX));
        key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// One accuracy table of calibration x fusion per qat_epochs value.
fn pivots(md: &mut String, runs: &[RunResult]) {
    let mut by_epochs: BTreeMap<u32, BTreeMap<(String, String), String>> = BTreeMap::new();
    for run in runs {
        let r = &run.row;
        // Runs with ops in float have their own section.
        let Some(epochs) = r.qat_epochs.parse::<u32>().ok().filter(|_| r.float_layers == "0") else {
            continue;
        };
        let cell = r.quality().map_or_else(|| r.status.clone(), |a| format!("{a:.2}%"));
        by_epochs.entry(epochs).or_default().insert((r.calibration.clone(), r.residual_fusion.clone()), cell);
    }
    for (epochs, cells) in by_epochs {
        let title = if epochs == 0 { "PTQ (qat_epochs = 0)".to_string() } else { format!("QAT, {epochs} epoch(s)") };
        let _ = writeln!(md, "\n## {title}: accuracy by calibration and residual fusion\n");
        md.push_str("| calibration | unfused | fused |\n|---|---|---|\n");
        let mut methods: Vec<&String> = cells.keys().map(|(m, _)| m).collect();
        methods.dedup();
        for method in methods {
            let cell =
                |fused: &str| cells.get(&(method.clone(), fused.to_string())).cloned().unwrap_or_else(|| "-".into());
            let _ = writeln!(md, "| {method} | {} | {} |", cell("false"), cell("true"));
        }
    }
}

fn describe(r: &RunRow) -> String {
    let fusion = if r.residual_fusion == "true" { ", residual fusion" } else { "" };
    let recipe = match r.qat_epochs.as_str() {
        "0" => format!("PTQ, {} calibration{fusion}", r.calibration),
        epochs => format!("QAT {epochs} epoch(s) from {} PTQ{fusion}", r.calibration),
    };
    let kernels = match (r.int8_kernel_share, r.int8_flop_share) {
        (Some(ops), Some(flops)) => {
            format!("; int8 kernels {:.0}% of weighted ops, {:.0}% of MACs", ops * 100.0, flops * 100.0)
        }
        (Some(ops), None) => format!("; int8 kernels {:.0}% of weighted ops", ops * 100.0),
        _ => String::new(),
    };
    let adds = match r.float_residual_adds.split(';').filter(|a| !a.is_empty()).count() {
        0 => String::new(),
        n => format!("; {n} residual Add(s) in float"),
    };
    let float = match r.float_ops.split(';').filter(|o| !o.is_empty()).count() {
        0 => String::new(),
        n => format!("; {n} op(s) left in float ({})", r.float_ops.replace(';', ", ")),
    };
    let budget = match r.budget_met {
        Some(false) => "; accuracy budget not met, best step kept",
        _ => "",
    };
    format!("{recipe}{float}{budget}{kernels}{adds}; {} format, {} Q/DQ", r.int8_format, r.qdq_pairs.unwrap_or(0))
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Prints a short table of results for the terminal.
pub fn print_table(runs: &[RunResult], out: &Path) {
    let measure =
        if runs.iter().any(|r| r.row.accuracy.is_none() && r.row.agreement.is_some()) { "agree" } else { "top-1" };
    // As wide as the longest run id, so the columns line up.
    let width = runs.iter().map(|r| r.row.run.len()).max().unwrap_or(0).max(24);
    println!("{:<width$} {:>8} {:>10} {:>10} {:>12}  status", "run", measure, "delta", "p50 ms", "img/s");
    for run in runs {
        let r = &run.row;
        let show = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        println!(
            "{:<width$} {:>8} {:>10} {:>10} {:>12}  {}",
            r.run,
            show(r.quality(), 2),
            show(r.accuracy_delta.filter(|_| r.run != "fp32"), 2),
            show(r.latency_p50_ms, 3),
            show(r.throughput, 0),
            r.status
        );
    }
    println!("\nreports in {}: report.html, runs.csv, runs.jsonl, summary.md, accuracy_latency.svg", out.display());
}
