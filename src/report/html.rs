//! report.html: the whole sweep on one page that needs nothing else. The
//! page is this module's data (one JSON document) plus the project's own
//! script and style sheet, both compiled into the binary, so it opens from
//! file://, from a CI artifact or an e-mail attachment, offline, and its
//! Content-Security-Policy forbids every request beyond the page itself.
//!
//! Why no charting library: the page has five small views (a scatter plot,
//! parallel coordinates, a sortable table, per-run details and a two-run
//! comparison), which take a few hundred lines of plain DOM and SVG code.
//! Embedding plotly.js would add about 3.5 MB to every report and a second
//! release cycle to follow; our own script adds about 30 KB, so a 10,000-run
//! report is mostly its data.
//!
//! Shared work is stored once: each run names its tasks, recipes' rankings
//! and calibration passes by index, as the plan does.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::fallback::Findings;
use super::health::{self, Assessed};
use super::qat::QatFindings;
use super::{best_run, plot, quality_measure, RunResult, RunRow};
use crate::plan::{Plan, StageKind};
use crate::quant::health::findings as health_findings;
use crate::store::ResultsDir;

const SCRIPT: &str = include_str!("html/report.js");
const STYLE: &str = include_str!("html/report.css");

/// Everything the page shows, gathered from the results directory.
pub struct Inputs<'a> {
    pub results: &'a ResultsDir,
    pub plan: &'a Plan,
    pub runs: &'a [RunResult],
    pub findings: &'a Findings,
    pub calibrations: &'a [Assessed],
    pub qat: &'a QatFindings,
}

/// The page, ready to write.
pub fn page(inputs: &Inputs<'_>) -> String {
    let data = data(inputs).to_string();
    let title = escape_text(&inputs.plan.sweep);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}: qsweep report</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n\
         <noscript>This report draws its tables and charts with JavaScript; summary.md and runs.csv hold the same results as text.</noscript>\n\
         <script type=\"application/json\" id=\"qsweep-data\">{}</script>\n<script>\n{SCRIPT}</script>\n</body>\n</html>\n",
        escape_script(&data)
    )
}

/// The page's JSON document.
fn data(inputs: &Inputs<'_>) -> Value {
    let Inputs { results, plan, runs, findings, calibrations, qat } = inputs;
    let columns: Vec<String> = fields(&RunRow::default()).keys().cloned().collect();

    let run_counts = plan.run_counts();
    let present_at_start: HashSet<&str> = plan.present_at_start.iter().map(String::as_str).collect();
    let task_index: HashMap<_, usize> = plan.tasks.iter().enumerate().map(|(i, t)| (&t.key, i)).collect();
    let tasks: Vec<Value> = plan
        .tasks
        .iter()
        .map(|task| {
            let manifest = results.manifest(&task.key);
            let state = match &manifest {
                Some(m) if present_at_start.contains(m.short_digest()) => "cached",
                Some(_) => "ran",
                None if results.failure(&task.key).is_some() => "failed",
                None => "pending",
            };
            json!([
                task.stage.to_string(),
                task.key.short(),
                manifest.map(|m| m.elapsed_s),
                state,
                run_counts.get(&task.key).copied().unwrap_or(0),
            ])
        })
        .collect();

    let ranking_index: HashMap<_, usize> = findings.rankings.iter().enumerate().map(|(i, r)| (&r.key, i)).collect();
    let health_index: HashMap<_, usize> = calibrations.iter().enumerate().map(|(i, c)| (&c.key, i)).collect();
    let search_index: HashMap<&str, usize> =
        findings.searches.iter().enumerate().map(|(i, s)| (s.run.as_str(), i)).collect();
    let mut environments: Vec<Value> = Vec::new();
    let mut environment_index: HashMap<String, usize> = HashMap::new();

    let mut rows = Vec::with_capacity(runs.len());
    let mut details = Vec::with_capacity(runs.len());
    for (run, planned) in runs.iter().zip(&plan.runs) {
        rows.push(Value::Array(fields(&run.row).into_iter().map(|(_, v)| v).collect()));
        let own_tasks: Vec<usize> = planned.tasks.iter().filter_map(|k| task_index.get(k).copied()).collect();
        let of_stage = |stage: StageKind| planned.tasks.iter().find(|k| plan.task(k).is_some_and(|t| t.stage == stage));
        let environment = run.evaluation.as_ref().map(|evaluation| {
            let described = environment(evaluation);
            let text = described.to_string();
            *environment_index.entry(text).or_insert_with(|| {
                environments.push(described);
                environments.len() - 1
            })
        });
        details.push(json!({
            "tasks": own_tasks,
            "environment": environment,
            "ranking": of_stage(StageKind::Sensitivity).and_then(|k| ranking_index.get(k)),
            "health": of_stage(StageKind::Calibrate).and_then(|k| health_index.get(k)),
            "search": search_index.get(run.row.run.as_str()),
            "qat": qat.run(&run.row.run).map(|q| json!({
                "curve": q.curve.iter().map(|p| json!({"epoch": p.epoch, "top1": p.top1, "loss": p.loss, "learning_rate": p.learning_rate})).collect::<Vec<_>>(),
                "kept_epoch": q.kept_epoch,
                "returned_start": q.returned_start(),
                "learning_rate": q.learning_rate,
                "chosen_by": q.chosen_by,
                "augment": q.augment,
                "select": q.select,
                "validation_samples": q.validation_samples,
                "diverged": q.diverged,
            })),
        }));
    }

    let rankings: Vec<Value> =
        findings.rankings.iter().map(|r| json!({"title": r.title, "ranking": r.ranking})).collect();
    let healths: Vec<Value> = calibrations
        .iter()
        .map(|c| match &c.health {
            Ok(h) => json!({
                "title": c.title.trim_start_matches("## "),
                "line": format!("{} calibration samples; {}.", h.samples, health::set_line(h)),
                "findings": health_findings(h),
                "columns": health::COLUMNS,
                "rows": h.tensors.iter().map(health::cells).collect::<Vec<_>>(),
            }),
            Err(error) => json!({
                "title": c.title.trim_start_matches("## "),
                "line": format!("The calibration statistics cannot be read: {error}"),
                "findings": [], "columns": [], "rows": [],
            }),
        })
        .collect();
    let searches: Vec<&_> = findings.searches.iter().map(|s| &s.search).collect();

    let recommendation = match findings.recommended(runs) {
        Some(r) if r.within > 0 => json!({
            "run": r.run.run,
            "why": format!("the fastest of {} run(s) within {} points of fp32's test top-1", r.within, r.budget),
        }),
        Some(r) => json!({
            "run": r.run.run,
            "why": format!("no run is within {} points of fp32's test top-1; this one comes closest", r.budget),
        }),
        None => match best_run(runs) {
            Some(best) => json!({"run": best.run, "why": "the most accurate run (the sweep sets no accuracy budget)"}),
            None => Value::Null,
        },
    };
    let (quality, measure) = quality_measure(runs);
    let budget = findings.budget();

    json!({
        "sweep": plan.sweep,
        "quality": quality,
        "measure": measure,
        "budget": budget,
        "relevant_from": plot::zoom_floor(runs, budget),
        "recommendation": recommendation,
        "columns": columns,
        "rows": rows,
        "details": details,
        "tasks": tasks,
        "environments": environments,
        "rankings": rankings,
        "healths": healths,
        "searches": searches,
    })
}

/// A run's runs.csv columns by name, in runs.csv's order.
fn fields(row: &RunRow) -> serde_json::Map<String, Value> {
    match serde_json::to_value(row) {
        Ok(Value::Object(fields)) => fields,
        _ => unreachable!("a RunRow serializes as an object"),
    }
}

/// Where and how a run was measured: the part of its evaluation that
/// runs share.
fn environment(evaluation: &Value) -> Value {
    let batches: Vec<u64> =
        evaluation["latency"].as_array().into_iter().flatten().filter_map(|l| l["batch"].as_u64()).collect();
    json!({
        "engine": evaluation["engine"],
        "onnxruntime": evaluation["onnxruntime"],
        "threads": evaluation["threads"],
        "machine": evaluation["machine"],
        "test_images": evaluation["test_images"],
        "latency_batch": batches.iter().min(),
        "throughput_batch": batches.iter().max(),
    })
}

/// Text for the title element.
fn escape_text(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// JSON inside a script element ends at the first `</` (and `<!--`
/// changes how it is parsed), whatever the JSON means. `<` only occurs in
/// JSON inside strings, where `\u003c` is the same character.
fn escape_script(json: &str) -> String {
    json.replace('<', "\\u003c")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_cannot_close_its_script_element() {
        let escaped = escape_script(r#"{"run": "</script><script>alert(1)</script>", "c": "<!-- x"}"#);
        assert!(!escaped.contains("</"), "{escaped}");
        assert!(!escaped.contains("<!--"), "{escaped}");
        let value: Value = serde_json::from_str(&escaped).expect("still JSON");
        assert_eq!(value["run"], "</script><script>alert(1)</script>");
        assert_eq!(value["c"], "<!-- x");
    }
}
