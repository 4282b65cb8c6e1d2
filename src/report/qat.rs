//! What QAT did: each QAT run's validation curve (epoch 0 is the PTQ model
//! it started from), the epoch it kept, the learning rate and where it
//! came from, and the range test's candidates; for summary.md,
//! qat_validation.svg and report.html.
//!
//! Read from the qat and learning-rate artifacts the stored plan names; a
//! run whose QAT stage has not finished is left out.

use std::fmt::Write as _;

use plotters::prelude::*;
use serde_json::Value;

use super::plot::method_colour;
use super::RunResult;
use crate::plan::{Plan, StageKind};
use crate::store::ResultsDir;
use crate::train::fit::{Divergence, EpochScore};

/// One QAT run's fine-tuning, as its stage recorded it.
pub struct QatRun {
    pub run: String,
    pub calibration: String,
    pub fused: bool,
    pub curve: Vec<EpochScore>,
    /// The epoch whose weights the run built; 0 is its PTQ start.
    pub kept_epoch: u32,
    pub learning_rate: f64,
    /// "spec" or "range test".
    pub chosen_by: String,
    /// The augmentation in torchvision's notation; empty for none.
    pub augment: Vec<String>,
    /// "best" or "last".
    pub select: String,
    pub validation_samples: u64,
    /// Where its loss stopped being finite, when it returned its kept
    /// epoch rather than failing.
    pub diverged: Option<Divergence>,
}

impl QatRun {
    /// Whether the run built the model it started from because no epoch
    /// beat it (a run that diverged has its own verdict).
    pub fn returned_start(&self) -> bool {
        self.kept_epoch == 0 && self.diverged.is_none()
    }
}

/// The range test's scores, where `learning_rate: "auto"` ran one.
pub struct RangeTest {
    pub chosen: f64,
    /// (rate, validation top-1 after its share of an epoch).
    pub candidates: Vec<(f64, f64)>,
    pub start_top1: Option<f64>,
    pub samples: u64,
}

#[derive(Default)]
pub struct QatFindings {
    pub runs: Vec<QatRun>,
    pub range_tests: Vec<RangeTest>,
}

/// The chart's file name.
pub const CHART: &str = "qat_validation.svg";

impl QatFindings {
    pub fn collect(results: &ResultsDir, plan: &Plan) -> Self {
        let mut findings = QatFindings::default();
        for task in plan.tasks.iter().filter(|t| t.stage == StageKind::LearningRate) {
            let Some(manifest) = results.manifest(&task.key) else { continue };
            let m = &manifest.metrics;
            let candidates = m["candidates"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| Some((c["learning_rate"].as_f64()?, c["top1"].as_f64()?)))
                .collect();
            findings.range_tests.push(RangeTest {
                chosen: m["learning_rate"].as_f64().unwrap_or_default(),
                candidates,
                start_top1: m["start_top1"].as_f64(),
                samples: m["samples"].as_u64().unwrap_or_default(),
            });
        }
        for planned in &plan.runs {
            let qat = planned.tasks.iter().filter_map(|key| plan.task(key)).find(|t| t.stage == StageKind::Qat);
            let Some(manifest) = qat.and_then(|task| results.manifest(&task.key)) else { continue };
            let m = &manifest.metrics;
            let Ok(curve) = serde_json::from_value::<Vec<EpochScore>>(m["curve"].clone()) else { continue };
            let text = |value: &Value| value.as_str().unwrap_or_default().to_string();
            findings.runs.push(QatRun {
                run: planned.run.id.clone(),
                calibration: planned.run.recipe().map(|r| r.calibration.name().to_string()).unwrap_or_default(),
                fused: planned.run.recipe().is_some_and(|r| r.residual_fusion),
                kept_epoch: m["kept_epoch"].as_u64().unwrap_or_default() as u32,
                learning_rate: m["learning_rate"].as_f64().unwrap_or_default(),
                chosen_by: text(&m["learning_rate_from"]),
                augment: m["augment"].as_array().into_iter().flatten().map(text).collect(),
                select: text(&m["select"]),
                validation_samples: m["validation_samples"].as_u64().unwrap_or_default(),
                diverged: serde_json::from_value(m["diverged"].clone()).unwrap_or_default(),
                curve,
            });
        }
        findings
    }

    pub fn run(&self, id: &str) -> Option<&QatRun> {
        self.runs.iter().find(|r| r.run == id)
    }

    /// The summary.md section.
    pub fn markdown(&self, runs: &[RunResult]) -> String {
        let Some(first) = self.runs.first() else { return String::new() };
        let mut md = String::from("\n## QAT\n\n");
        let augment = if first.augment.is_empty() { "none".to_string() } else { first.augment.join(", ") };
        let _ = writeln!(
            md,
            "Each QAT run fine-tunes its PTQ model and is scored on a validation subset of {} images (drawn from the \
             training source; none is a calibration, fine-tuning or test image) before training (epoch 0, the PTQ \
             start) and after every epoch. It keeps {}. Augmentation: {augment}.\n",
            first.validation_samples,
            if first.select == "last" {
                "the last epoch (`qat.select: \"last\"`)"
            } else {
                "the best epoch: a later epoch displaces an earlier one only when it is right on significantly more \
                 validation images than it is wrong on where the earlier one was right (McNemar's test, one-sided, 5%), \
                 so a run no epoch clearly improves returns its PTQ start"
            },
        );
        for test in &self.range_tests {
            let scores: Vec<String> = test
                .candidates
                .iter()
                .map(|(rate, top1)| {
                    let mark = if *rate == test.chosen { " (chosen)" } else { "" };
                    format!("{} {top1:.2}%{mark}", rate_text(*rate))
                })
                .collect();
            let start = test.start_top1.map_or(String::new(), |s| format!(", from {s:.2}% at the start"));
            let _ = writeln!(
                md,
                "Learning rate {} (`\"auto\"`): a range test fine-tuned the mse, unfused PTQ model on {} images per \
                 candidate and scored it on the validation subset: {}{start}.\n",
                rate_text(test.chosen),
                test.samples,
                scores.join(", "),
            );
        }
        md.push_str(
            "| run | learning rate | validation top-1 by epoch (0 = PTQ start) | kept | test top-1 | its PTQ twin |\n",
        );
        md.push_str("|---|---|---|---|---|---|\n");
        for qat in &self.runs {
            let epochs: Vec<String> = qat
                .curve
                .iter()
                .map(
                    |p| if p.epoch == qat.kept_epoch { format!("**{:.2}**", p.top1) } else { format!("{:.2}", p.top1) },
                )
                .collect();
            let row = runs.iter().find(|r| r.row.run == qat.run).map(|r| &r.row);
            let twin = row.and_then(|row| ptq_twin(runs, row));
            let percent = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}%"));
            let _ = writeln!(
                md,
                "| {} | {} ({}) | {} | {} | {} | {} |",
                qat.run,
                rate_text(qat.learning_rate),
                qat.chosen_by,
                epochs.join(" → "),
                qat.kept_epoch,
                percent(row.and_then(|r| r.accuracy)),
                percent(twin.and_then(|r| r.accuracy)),
            );
        }
        for qat in self.runs.iter().filter(|q| q.returned_start()) {
            let start = &qat.curve[0];
            let best_after = qat.curve[1..].iter().reduce(|best, p| if p.correct > best.correct { p } else { best });
            let after = best_after
                .map_or(String::new(), |b| format!(" (after training, at best {:.2}%, epoch {})", b.top1, b.epoch));
            let advice = if qat.chosen_by == "spec" {
                "try a lower `qat.learning_rate`, or \"auto\""
            } else {
                "the PTQ model may already be as good as this recipe gets it"
            };
            let _ = writeln!(
                md,
                "\n- **`{}` returned its PTQ start**: no epoch beat its validation top-1 before training, {:.2}%, by more \
                 than noise{after}. So it built the PTQ model unchanged (learning rate {}); {advice}.",
                qat.run,
                start.top1,
                rate_text(qat.learning_rate),
            );
        }
        for qat in &self.runs {
            let Some(Divergence { epoch, step }) = qat.diverged else { continue };
            let kept = qat.curve.iter().find(|p| p.epoch == qat.kept_epoch).map_or(0.0, |p| p.top1);
            let rate = rate_text(qat.learning_rate);
            let advice = if qat.chosen_by == "spec" {
                format!("lower `qat.learning_rate` (it was {rate})")
            } else {
                format!("set `qat.learning_rate` to a number below the range test's pick, {rate}")
            };
            let _ = writeln!(
                md,
                "\n- **`{}` diverged**: its training loss stopped being finite at epoch {epoch}, step {step}, so it \
                 stopped there and built epoch {} (validation {kept:.2}%), the best before it; {advice}.",
                qat.run, qat.kept_epoch,
            );
        }
        let _ = writeln!(md, "\n![validation top-1 by epoch]({CHART})");
        md
    }

    /// qat_validation.svg: every QAT run's validation top-1 by epoch, its
    /// kept epoch marked; none without QAT runs.
    pub fn chart(&self) -> Option<String> {
        if self.runs.is_empty() {
            return None;
        }
        let points = self.runs.iter().flat_map(|r| r.curve.iter());
        let (low, high) = points.clone().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.top1), hi.max(p.top1)));
        let epochs = points.map(|p| p.epoch).max().unwrap_or(1).max(1) as f64;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (760, 460)).into_drawing_area();
            let _ = root.fill(&WHITE);
            let margin = ((high - low) * 0.1).max(0.2);
            let chart = ChartBuilder::on(&root)
                .caption("QAT: validation top-1 by epoch (0 = PTQ start; ringed: the epoch kept)", ("sans-serif", 17))
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(-0.2..epochs + 0.2, (low - margin).max(0.0)..(high + margin).min(100.0));
            let Ok(mut chart) = chart else { return None };
            let _ = chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc("validation top-1 (%)")
                .x_labels(epochs as usize + 1)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw();
            for qat in &self.runs {
                let colour = method_colour(&qat.calibration);
                let line: Vec<(f64, f64)> = qat.curve.iter().map(|p| (p.epoch as f64, p.top1)).collect();
                let style = colour.stroke_width(if qat.fused { 2 } else { 1 });
                let _ = chart
                    .draw_series(LineSeries::new(line, style).point_size(3))
                    .map(|s| s.label(&qat.run).legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style)));
                if let Some(kept) = qat.curve.iter().find(|p| p.epoch == qat.kept_epoch) {
                    let ring = Circle::new((kept.epoch as f64, kept.top1), 7, colour.stroke_width(2));
                    let _ = chart.draw_series(std::iter::once(ring));
                }
            }
            let _ = chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 12))
                .draw();
            let _ = root.present();
        }
        Some(svg)
    }
}

/// The run that is this one without QAT: same method, fusion and ops in
/// float, 0 epochs.
fn ptq_twin<'a>(runs: &'a [RunResult], row: &super::RunRow) -> Option<&'a super::RunRow> {
    runs.iter().map(|r| &r.row).find(|r| {
        r.qat_epochs == "0"
            && r.calibration == row.calibration
            && r.residual_fusion == row.residual_fusion
            && r.float_layers == row.float_layers
    })
}

/// A learning rate as people write it: 0.0003 as 3e-4.
fn rate_text(rate: f64) -> String {
    format!("{rate:e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(epoch: u32, top1: f64) -> EpochScore {
        EpochScore { epoch, top1, correct: (top1 * 20.0) as usize, loss: 0.3, learning_rate: 1e-3, train_loss: None }
    }

    fn run(id: &str, chosen_by: &str, diverged: Option<Divergence>) -> QatRun {
        QatRun {
            run: id.into(),
            calibration: "mse".into(),
            fused: true,
            curve: vec![point(0, 92.0), point(1, 91.0)],
            kept_epoch: 0,
            learning_rate: 1e-3,
            chosen_by: chosen_by.into(),
            augment: Vec::new(),
            select: "best".into(),
            validation_samples: 2000,
            diverged,
        }
    }

    /// A run that diverged and kept its start is told to lower its rate,
    /// not that its PTQ model may be as good as it gets.
    #[test]
    fn a_diverged_run_gets_its_own_verdict() {
        let findings = QatFindings {
            runs: vec![
                run("a-qat2", "range test", Some(Divergence { epoch: 2, step: 7 })),
                run("b-qat2", "range test", None),
            ],
            range_tests: Vec::new(),
        };
        let md = findings.markdown(&[]);
        assert!(
            md.contains("**`a-qat2` diverged**: its training loss stopped being finite at epoch 2, step 7"),
            "{md}"
        );
        assert!(md.contains("set `qat.learning_rate` to a number below the range test's pick"), "{md}");
        assert!(!md.contains("**`a-qat2` returned its PTQ start**"), "{md}");
        assert!(md.contains("**`b-qat2` returned its PTQ start**"), "{md}");
    }
}
