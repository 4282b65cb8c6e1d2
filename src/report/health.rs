//! summary.md's calibration health section: the outliers in words, then
//! one table row per quantized tensor, read from the calibrate artifact's
//! histograms.json, so it explains a bad int8 run by its tensors before
//! anyone opens a profiler.

use std::fmt::Write as _;

use crate::plan::{Plan, StageKind, TaskKey};
use crate::quant::health::{self, Health, TensorHealth};
use crate::spec::CalibrationMethod;
use crate::stages::calibrate::Statistics;
use crate::store::ResultsDir;

/// The spec's default; the report uses it when no task records one.
const DEFAULT_PERCENTILE: f64 = 99.99;

/// One finished calibrate task's health, or why its statistics cannot
/// be read.
pub struct Assessed {
    pub key: TaskKey,
    /// `## Calibration health`, naming the task when the plan has several.
    pub title: String,
    pub health: Result<Health, String>,
}

/// Every finished calibrate task of the plan, assessed at the sweep's
/// percentile, and whether a task recorded that percentile.
pub fn assess_all(results: &ResultsDir, plan: &Plan) -> (Vec<Assessed>, bool) {
    let calibrations: Vec<_> =
        plan.tasks.iter().filter(|t| t.stage == StageKind::Calibrate && results.manifest(&t.key).is_some()).collect();
    let (percentile, recorded) = percentile(plan);
    let assessed = calibrations
        .iter()
        .map(|task| Assessed {
            key: task.key.clone(),
            title: match calibrations.len() {
                1 => "## Calibration health".to_string(),
                _ => format!("## Calibration health (calibrate `{}`)", task.key.short()),
            },
            health: Statistics::read(&results.artifact_dir(&task.key))
                .map(|statistics| {
                    health::assess(
                        statistics.samples,
                        statistics.tensors.iter().map(|t| t.measured()),
                        statistics.lint.as_ref(),
                        percentile,
                    )
                })
                .map_err(|e| e.to_string()),
        })
        .collect();
    (assessed, recorded)
}

/// The section for every assessed calibrate task; empty when none has
/// finished.
pub fn section(assessed: &[Assessed], percentile_recorded: bool) -> String {
    let mut md = String::new();
    for calibration in assessed {
        match &calibration.health {
            Ok(health) => md.push_str(&render(&calibration.title, health, percentile_recorded)),
            Err(error) => {
                let _ = writeln!(md, "\n{}\n\nThe calibration statistics cannot be read: {error}", calibration.title);
            }
        }
    }
    md
}

/// The percentile the sweep's percentile runs use, and whether a task
/// recorded it: only percentile builds (and their QAT) carry it in their
/// parameters, as only they read it.
fn percentile(plan: &Plan) -> (f64, bool) {
    plan.tasks.iter().find_map(|t| t.params["percentile"].as_f64()).map_or((DEFAULT_PERCENTILE, false), |p| (p, true))
}

/// The section for one calibration pass.
pub fn render(title: &str, health: &Health, percentile_recorded: bool) -> String {
    let mut md = format!("\n{title}\n\n");
    let percentile = if percentile_recorded {
        format!("percentile is p{}", health.percentile)
    } else {
        format!("percentile is shown at the default p{} (no percentile run records the spec's)", health.percentile)
    };
    let _ = writeln!(
        md,
        "{} calibration samples; {}. Per method, amax as a fraction of max and the share of values it clips \
         (max clips none); {percentile}. Flagged: a bin other than bin 0 (zeros, normal after ReLU) holding over \
         {} of the other values, a method clipping over {}, a last batch growing the range over {}x, any dead \
         channel, duplicate or constant images, classes over {}x apart.\n",
        health.samples,
        set_line(health),
        health::percent(health::PEAK_SHARE),
        health::percent(health::CLIPPED_SHARE),
        health::GROWTH,
        health::CLASS_RATIO,
    );
    let findings = health::findings(health);
    if findings.is_empty() {
        md.push_str("Nothing crosses a threshold.\n");
    }
    for finding in &findings {
        let _ = writeln!(md, "- {finding}");
    }
    let _ = writeln!(md, "\n| {} |\n|{}", COLUMNS.join(" | "), "---|".repeat(COLUMNS.len()));
    for tensor in &health.tensors {
        let _ = writeln!(md, "| {} |", cells(tensor).join(" | "));
    }
    md
}

/// The per-tensor table's columns, for summary.md and report.html alike.
pub const COLUMNS: [&str; 10] = [
    "tensor",
    "producer",
    "bin 0",
    "largest other bin",
    "max",
    "mse",
    "entropy",
    "percentile",
    "last-batch growth",
    "dead channels",
];

/// What the lint found in the images, in one clause.
pub fn set_line(health: &Health) -> String {
    let Some(lint) = &health.lint else {
        return "the image lint is missing (statistics from before calibrate version 3)".into();
    };
    let classes = match lint.class_counts.as_ref().and_then(|c| Some((c, health::class_extremes(c)?))) {
        Some((counts, ((_, fewest), (_, most)))) => format!(", {} classes of {fewest} to {most} samples", counts.len()),
        None => ", no labels".into(),
    };
    format!("{} exact duplicate(s), {} constant image(s){classes}", lint.duplicates, lint.constant)
}

/// One tensor's row under [`COLUMNS`], names in backticks.
pub fn cells(t: &TensorHealth) -> Vec<String> {
    let producer = t.producer.as_ref().map_or("graph input".to_string(), |p| format!("{} `{}`", p.op, p.node));
    let name = format!("`{}`", t.name);
    if t.dead {
        let unmeasured = || "-".to_string();
        return vec![
            name,
            producer,
            "100%".into(),
            unmeasured(),
            "0".into(),
            unmeasured(),
            unmeasured(),
            unmeasured(),
            unmeasured(),
            "all (dead tensor)".into(),
        ];
    }
    let peak = t.peak.map_or("-".to_string(), |p| {
        format!(
            "{} at {}-{}",
            health::percent(p.share),
            health::number(f64::from(p.low)),
            health::number(f64::from(p.high))
        )
    });
    let method = |m: CalibrationMethod| {
        t.clips
            .iter()
            .find(|c| c.method == m)
            .map_or("-".to_string(), |c| format!("{:.2}, {}", c.of_max, health::percent(c.clipped)))
    };
    let growth = match t.growth {
        None => "-".to_string(),
        Some(g) if g.is_infinite() => "new in last batch".to_string(),
        Some(g) => format!("{g:.2}x"),
    };
    let dead = match (t.channels, t.dead_channels.len()) {
        (0, _) => "-".to_string(),
        (channels, 0) => format!("0 of {channels}"),
        (channels, n) => format!("{n} of {channels}"),
    };
    vec![
        name,
        producer,
        health::percent(t.zero_share),
        peak,
        health::number(f64::from(t.max)),
        method(CalibrationMethod::Mse),
        method(CalibrationMethod::Entropy),
        method(CalibrationMethod::Percentile),
        growth,
        dead,
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::quant::health::{Measured, Producer, SetLint};
    use crate::quant::histogram::Histogram;

    /// A healthy post-ReLU tensor and one with dead channels and a late
    /// range, rendered as rows and findings, with the set's lint line.
    #[test]
    fn the_section_has_the_findings_the_table_and_the_set_line() {
        let mut relu = Histogram::new();
        let mut values = vec![0.0f32; 6000];
        values.extend((0..4000).map(|i| i as f32 / 1000.0));
        relu.add(&values).unwrap();
        let conv = Producer { node: "/layer1/conv1/Conv".into(), op: "Conv".into() };
        let tensors = [
            Measured {
                name: "/layer1/relu/Relu_output_0",
                producer: Some(&conv),
                histogram: &relu,
                max_before_last_batch: Some(4.0),
                channel_max: &[4.0, 3.0],
            },
            Measured {
                name: "/layer2/conv/Conv_output_0",
                producer: Some(&conv),
                histogram: &relu,
                max_before_last_batch: Some(2.0),
                channel_max: &[4.0, 0.0, 3.0],
            },
        ];
        let counts: BTreeMap<i64, u64> = [(0, 30), (1, 34)].into();
        let lint = SetLint { duplicates: 2, constant: 0, class_counts: Some(counts) };
        let health = health::assess(64, tensors, Some(&lint), 99.99);
        let md = render("## Calibration health", &health, false);

        assert!(
            md.contains(
                "64 calibration samples; 2 exact duplicate(s), 0 constant image(s), 2 classes of 30 to 34 samples"
            ),
            "{md}"
        );
        assert!(md.contains("default p99.99"), "{md}");
        assert!(md.contains("- calibration set: 2 sample(s) repeat an earlier one exactly"), "{md}");
        let late = "- `/layer2/conv/Conv_output_0` (output of Conv `/layer1/conv1/Conv`): the last batch grew its range 2.00x; 1 of 3 channels are zero over the whole set (1)";
        assert!(md.contains(late), "{md}");
        assert!(!md.contains("- `/layer1/relu/Relu_output_0`"), "the healthy tensor is not flagged: {md}");
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(rows.len(), 2, "{md}");
        assert!(
            rows[0].starts_with("| `/layer1/relu/Relu_output_0` | Conv `/layer1/conv1/Conv` | 60% |"),
            "{}",
            rows[0]
        );
        assert!(rows[0].contains(" | 4.00 | ") && rows[0].ends_with("| 1.00x | 0 of 2 |"), "{}", rows[0]);
        assert!(rows[1].ends_with("| 2.00x | 1 of 3 |"), "{}", rows[1]);
    }
}
