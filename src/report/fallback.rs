//! What costs accuracy, and what `float_layers` bought back: the
//! sensitivity ranking of each PTQ recipe (a table, and a bar chart per
//! recipe), every step of each "auto" search (a table, and the curve of
//! top-1 against ops in float), and the recommendation: the fastest run
//! whose test top-1 is within the sweep's accuracy budget of fp32's.
//!
//! Read from the sensitivity and fallback artifacts the stored plan
//! names; a recipe whose stage has not finished is left out.

use std::fmt::Write as _;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{RunResult, RunRow};
use crate::plan::{Plan, StageKind, Task, TaskKey};
use crate::stages::fallback::Search;
use crate::stages::sensitivity::Ranking;
use crate::store::ResultsDir;

/// Ops shown per recipe in the table and the chart.
const SHOWN: usize = 12;

/// One recipe's ranking, with the name its files and headings use.
pub struct RecipeRanking {
    /// The sensitivity task, which every run of the recipe names.
    pub key: TaskKey,
    /// e.g. `entropy, unfused`.
    pub title: String,
    /// e.g. `sensitivity_entropy_unfused.svg`.
    pub chart: String,
    pub ranking: Ranking,
}

/// One "auto" run's search.
pub struct RunSearch {
    pub run: String,
    pub chart: String,
    pub search: Search,
}

/// What the report shows about sensitivity and fallback.
#[derive(Default)]
pub struct Findings {
    pub rankings: Vec<RecipeRanking>,
    pub searches: Vec<RunSearch>,
}

impl Findings {
    pub fn collect(results: &ResultsDir, plan: &Plan) -> Self {
        let finished = |task: &Task| results.manifest(&task.key).is_some().then(|| results.artifact_dir(&task.key));
        let mut findings = Findings::default();
        for task in plan.tasks.iter().filter(|t| t.stage == StageKind::Sensitivity) {
            let Some(ranking) = finished(task).and_then(|dir| Ranking::read(&dir).ok()) else { continue };
            let method = task.params["quantizer"]["calibration"].as_str().unwrap_or("?");
            let fused = task.params["quantizer"]["residual_fusion"].as_bool() == Some(true);
            let fusion = if fused { "fused" } else { "unfused" };
            findings.rankings.push(RecipeRanking {
                key: task.key.clone(),
                title: format!("{method}, {fusion}"),
                chart: format!("sensitivity_{method}_{fusion}.svg"),
                ranking,
            });
        }
        for planned in &plan.runs {
            let searched =
                planned.tasks.iter().filter_map(|key| plan.task(key)).find(|t| t.stage == StageKind::Fallback);
            let Some(search) = searched.and_then(finished).and_then(|dir| Search::read(&dir).ok()) else { continue };
            let run = planned.run.id.clone();
            findings.searches.push(RunSearch { chart: format!("float_layers_{run}.svg"), run, search });
        }
        findings
    }

    /// The charts, as (file name, SVG text).
    pub fn charts(&self) -> Vec<(String, String)> {
        let bars = self.rankings.iter().map(|r| (r.chart.clone(), sensitivity_svg(&r.title, &r.ranking)));
        let curves = self.searches.iter().map(|s| (s.chart.clone(), curve_svg(&s.run, &s.search)));
        bars.chain(curves).collect()
    }

    /// The summary.md sections: what costs accuracy, each search, and the
    /// recommendation.
    pub fn markdown(&self, runs: &[RunResult]) -> String {
        let mut md = String::new();
        if !self.rankings.is_empty() {
            md.push_str(
                "\n## What costs accuracy\n\nEach PTQ recipe with every op quantized, then with one op at a time \
                 restored to float (with any op that reads its input through the same Q/DQ pair), against fp32 on \
                 the first images of the validation subset: a seeded draw from the calibration source that holds \
                 no calibration or test image. Most sensitive first: restoring it brings the model closest to fp32 \
                 (lowest KL of the softmax outputs).\n",
            );
        }
        for recipe in &self.rankings {
            let r = &recipe.ranking;
            let q = r.quantized;
            let _ = writeln!(
                md,
                "\n### {}\n\nEverything quantized: {:.1}% top-1 agreement with fp32 on {} images, KL {}, logit SQNR {:.1} dB.",
                recipe.title,
                q.agreement * 100.0,
                r.samples,
                nats(q.kl),
                q.sqnr_db
            );
            if let Some(first) = r.ops.first() {
                let recovered = if q.kl > 0.0 { 100.0 * (q.kl - first.restored.kl) / q.kl } else { 0.0 };
                let _ = writeln!(
                    md,
                    "The costliest op is `{}` ({}): in float it takes the KL from {} to {} ({recovered:.0}% of it) and agreement to {:.1}%.",
                    first.op.name,
                    first.op.op_type,
                    nats(q.kl),
                    nats(first.restored.kl),
                    first.restored.agreement * 100.0
                );
            }
            md.push_str(
                "\n| rank | op | its quantized inputs | also in float | agreement | KL | SQNR |\n|---|---|---|---|---|---|---|\n",
            );
            for (rank, row) in r.ops.iter().take(SHOWN).enumerate() {
                let with: Vec<String> =
                    row.float_ops.iter().filter(|o| **o != row.op.name).map(|o| format!("`{o}`")).collect();
                let inputs: Vec<String> = row.op.inputs.iter().map(|i| format!("`{i}`")).collect();
                let _ = writeln!(
                    md,
                    "| {} | `{}` ({}) | {} | {} | {:.1}% | {} | {:.1} dB |",
                    rank + 1,
                    row.op.name,
                    row.op.op_type,
                    inputs.join(", "),
                    if with.is_empty() { "-".to_string() } else { with.join(", ") },
                    row.restored.agreement * 100.0,
                    nats(row.restored.kl),
                    row.restored.sqnr_db
                );
            }
            if r.ops.len() > SHOWN {
                let _ = writeln!(md, "\n({} more ops in the sensitivity artifact.)", r.ops.len() - SHOWN);
            }
            let _ = writeln!(md, "\n![sensitivity of {}]({})", recipe.title, recipe.chart);
        }
        for run in &self.searches {
            let s = &run.search;
            let _ = writeln!(
                md,
                "\n## `{}`: ops left in float until validation top-1 is within {} points of fp32\n\nfp32: {:.2}% on {} validation images{}.",
                run.run,
                s.accuracy_budget,
                s.fp32_validation_top1,
                s.validation_images,
                s.fp32_test_top1.map_or(String::new(), |t| format!(", {t:.2}% on the test split"))
            );
            md.push_str("\n| ops in float | validation top-1 | test top-1 | latency p50 (CPU, batch 1) | within budget |\n|---|---|---|---|---|\n");
            for (index, step) in s.steps.iter().enumerate() {
                let ops = if step.float_ops.is_empty() {
                    "none".to_string()
                } else {
                    step.float_ops.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")
                };
                let chosen = if index == s.chosen { " (chosen)" } else { "" };
                let _ = writeln!(
                    md,
                    "| {} {ops}{chosen} | {:.2}% | {} | {:.3} ms | {} |",
                    step.float_ops.len(),
                    step.validation_top1,
                    step.test_top1.map_or("-".to_string(), |t| format!("{t:.2}%")),
                    step.latency_ms,
                    if step.within_budget { "yes" } else { "no" }
                );
            }
            match &s.note {
                Some(note) => {
                    let _ = writeln!(md, "\nBudget not met: {note}.");
                }
                None => {
                    let step = s.chosen_step();
                    let _ = writeln!(
                        md,
                        "\nBudget met with {} op(s) in float: {:.2}% on validation ({:+.2} against fp32){}.",
                        step.float_ops.len(),
                        step.validation_top1,
                        step.validation_top1 - s.fp32_validation_top1,
                        match (step.test_top1, s.fp32_test_top1) {
                            (Some(t), Some(f)) => format!(", {t:.2}% on the test split ({:+.2})", t - f),
                            _ => String::new(),
                        }
                    );
                }
            }
            let _ = writeln!(md, "\n![top-1 against ops in float for {}]({})", run.run, run.chart);
        }
        if let Some(recommendation) = self.recommendation(runs) {
            md.push_str(&recommendation);
        }
        md
    }

    /// The sweep's accuracy budget, in points of top-1, where a search
    /// ran against it.
    pub fn budget(&self) -> Option<f64> {
        self.searches.first().map(|s| s.search.accuracy_budget)
    }

    /// The fastest finished quantized run within the budget on the test
    /// split, or what comes closest when none is; none without a budget.
    pub fn recommended<'a>(&self, runs: &'a [RunResult]) -> Option<Recommendation<'a>> {
        let budget = self.budget()?;
        let quantized = runs.iter().map(|r| &r.row).filter(|r| r.status == "ok" && !r.calibration.is_empty());
        let within = quantized.clone().filter(|r| r.accuracy_delta.is_some_and(|d| d >= -budget));
        let fastest = within
            .clone()
            .min_by(|a, b| a.latency_p50_ms.unwrap_or(f64::MAX).total_cmp(&b.latency_p50_ms.unwrap_or(f64::MAX)));
        match fastest {
            Some(run) => Some(Recommendation { run, budget, within: within.count() }),
            None => {
                let closest =
                    quantized.max_by(|a, b| a.accuracy.unwrap_or(0.0).total_cmp(&b.accuracy.unwrap_or(0.0)))?;
                Some(Recommendation { run: closest, budget, within: 0 })
            }
        }
    }

    fn recommendation(&self, runs: &[RunResult]) -> Option<String> {
        let Recommendation { run: r, budget, within } = self.recommended(runs)?;
        let mut md = format!("\n## Recommendation (budget: {budget} points of test top-1 against fp32)\n\n");
        if within == 0 {
            let _ = writeln!(
                md,
                "No run is within the budget on the test split; the closest is `{}` at {:+.2} points.",
                r.run,
                r.accuracy_delta.unwrap_or(0.0)
            );
            return Some(md);
        }
        let float = match r.float_ops.split(';').filter(|o| !o.is_empty()).count() {
            0 => "every op quantized".to_string(),
            n => format!("{n} op(s) in float: {}", r.float_ops.replace(';', ", ")),
        };
        let _ = writeln!(
            md,
            "`{}`: {:.2}% ({:+.2}), {:.3} ms p50, {float}. The fastest of {within} run(s) within the budget.",
            r.run,
            r.accuracy.unwrap_or(0.0),
            r.accuracy_delta.unwrap_or(0.0),
            r.latency_p50_ms.unwrap_or(0.0),
        );
        Some(md)
    }
}

/// The run the report recommends under the sweep's accuracy budget.
pub struct Recommendation<'a> {
    pub run: &'a RunRow,
    /// Points of test top-1 against fp32.
    pub budget: f64,
    /// How many runs are within the budget; 0 when `run` is only the
    /// closest.
    pub within: usize,
}

/// A KL divergence for a table: three decimals, or two significant
/// digits below 0.001, where a well-quantized model's KL sits.
fn nats(kl: f64) -> String {
    if kl == 0.0 || kl >= 1e-3 {
        format!("{kl:.3}")
    } else {
        format!("{kl:.1e}")
    }
}

/// Horizontal bars: how much of the quantized model's KL against fp32
/// each op takes away when restored to float, most first.
fn sensitivity_svg(title: &str, ranking: &Ranking) -> String {
    let rows: Vec<(&str, f64)> = ranking
        .ops
        .iter()
        .take(SHOWN)
        .map(|o| (o.op.name.as_str(), (ranking.quantized.kl - o.restored.kl).max(0.0)))
        .collect();
    let widest = rows.iter().map(|r| r.1).fold(0.0, f64::max).max(1e-6);
    let height = 90 + 28 * rows.len().max(1) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (820, height)).into_drawing_area();
        let _ = root.fill(&WHITE);
        // Each bar carries its op's name and value to its right, so the
        // x axis runs on past the longest bar to leave them room.
        let chart = ChartBuilder::on(&root)
            .caption(format!("{title}: KL against fp32 removed by each op in float"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(12)
            .build_cartesian_2d(0.0..widest * 1.9, 0.0..rows.len().max(1) as f64);
        let Ok(mut chart) = chart else { return String::new() };
        let _ = chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("KL removed (nats), most sensitive op on top")
            .draw();
        for (i, &(name, value)) in rows.iter().enumerate() {
            let y = (rows.len() - 1 - i) as f64;
            let bar = Rectangle::new([(0.0, y + 0.15), (value, y + 0.85)], BLUE.mix(0.7).filled());
            let label = EmptyElement::at((value, y + 0.5))
                + Text::new(
                    format!("{name}  {}", nats(value)),
                    (6, 0),
                    ("sans-serif", 13).into_font().into_text_style(&root).pos(Pos::new(HPos::Left, VPos::Center)),
                );
            let _ = chart.draw_series([bar]);
            let _ = chart.draw_series(std::iter::once(label));
        }
        let _ = root.present();
    }
    svg
}

/// Top-1 on validation and test against the number of ops in float, with
/// fp32's levels and the chosen step marked.
fn curve_svg(run: &str, search: &Search) -> String {
    let validation: Vec<(f64, f64)> =
        search.steps.iter().map(|s| (s.float_ops.len() as f64, s.validation_top1)).collect();
    let test: Vec<(f64, f64)> =
        search.steps.iter().filter_map(|s| Some((s.float_ops.len() as f64, s.test_top1?))).collect();
    let levels = [Some(search.fp32_validation_top1), search.fp32_test_top1];
    let all = validation.iter().chain(&test).map(|p| p.1).chain(levels.iter().flatten().copied());
    let (low, high) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let x_max = validation.last().map_or(1.0, |p| p.0).max(1.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 440)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let chart = ChartBuilder::on(&root)
            .caption(format!("{run}: top-1 against ops in float"), ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.2..x_max + 0.2, (low - 1.0).max(0.0)..(high + 1.0).min(100.5));
        let Ok(mut chart) = chart else { return String::new() };
        let _ = chart.configure_mesh().x_desc("ops in float").y_desc("top-1 (%)").x_labels(x_max as usize + 2).draw();
        let series = [
            ("validation", &validation, BLUE, search.fp32_validation_top1.into()),
            ("test", &test, RED, search.fp32_test_top1),
        ];
        for (name, points, color, fp32) in series {
            if let Some(level) = fp32 {
                let line = LineSeries::new([(-0.2, level), (x_max + 0.2, level)], color.mix(0.4).stroke_width(1));
                let _ = chart.draw_series(line).map(|s| {
                    s.label(format!("fp32, {name}"))
                        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.mix(0.4)))
                });
            }
            let _ = chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(4))
                .map(|s| s.label(name).legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color)));
        }
        if let Some(step) = search.steps.get(search.chosen) {
            let at = (step.float_ops.len() as f64, step.validation_top1);
            let _ = chart.draw_series(std::iter::once(
                EmptyElement::at(at)
                    + Circle::new((0, 0), 8, BLACK.stroke_width(2))
                    + Text::new("chosen", (10, -18), ("sans-serif", 13).into_font()),
            ));
        }
        let _ = chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw();
        let _ = root.present();
    }
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_divergences_keep_their_digits() {
        assert_eq!(nats(0.5431), "0.543");
        assert_eq!(nats(0.0), "0.000");
        assert_eq!(nats(0.000041), "4.1e-5");
    }
}
