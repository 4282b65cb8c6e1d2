//! Calibration health: what the calibration pass measured, judged before
//! any engine is built, so that a bad range is explained by its tensor
//! rather than discovered as an accuracy drop.
//!
//! Per tensor: how concentrated the values are (the largest bin), where
//! each method clips and how much it clips, whether the last calibration
//! batch still grew the range, and which channels never fire. Per set:
//! duplicate and constant images, and class balance. `findings` picks
//! what crosses the thresholds below and says it in plain words.
//!
//! Bin 0 is left out of the largest-bin search. It holds the exact zeros
//! and every value below one bin width, and post-ReLU tensors are mostly
//! zeros by design, so a large bin 0 is normal there and is shown (as the
//! zero share) but never flagged. The cost: a point mass below one bin
//! width (everything squeezed under a far outlier) looks like zeros too;
//! the max and the clipped shares still show that case.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::amax::amax;
use super::histogram::Histogram;
use crate::spec::CalibrationMethod;

/// A bin outside bin 0 holding more than this share of the values outside
/// bin 0 is a point mass: int8 spends its levels on a range the values
/// barely use.
pub const PEAK_SHARE: f64 = 0.5;
/// Fewer values outside bin 0 than this say nothing about a peak.
pub const PEAK_MIN_VALUES: u64 = 1000;
/// A method clipping more than this share of the values saturates enough
/// of them to move accuracy (99.99 percentile clips 0.01% by design).
pub const CLIPPED_SHARE: f64 = 0.01;
/// The last batch raising the range by more than this factor says the
/// calibration set has not yet seen the tensor's range.
pub const GROWTH: f64 = 1.2;
/// Largest class over smallest beyond this: the ranges are those of a
/// few classes.
pub const CLASS_RATIO: f64 = 2.0;

/// The node that writes a tensor, as the ONNX graph names it, so a user
/// can find the tensor in Netron or onnx's printer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producer {
    pub node: String,
    pub op: String,
}

/// What the calibration images are, counted as the calibrate stage reads
/// them (hashes, not images, so memory stays bounded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SetLint {
    /// Samples identical, value for value, to an earlier sample.
    pub duplicates: u64,
    /// Samples whose every channel holds one value (a blank or solid
    /// colour image; per channel, because normalisation shifts channels
    /// apart).
    pub constant: u64,
    /// Samples per label, where the set has labels.
    #[serde(default)]
    pub class_counts: Option<BTreeMap<i64, u64>>,
}

/// One tensor as the calibrate stage measured it.
#[derive(Debug, Clone, Copy)]
pub struct Measured<'a> {
    pub name: &'a str,
    pub producer: Option<&'a Producer>,
    pub histogram: &'a Histogram,
    /// The running max of |x| before the last batch; None when the pass
    /// had one batch only (or the record predates it).
    pub max_before_last_batch: Option<f32>,
    /// Max of |x| per channel (axis 1); empty where unknown.
    pub channel_max: &'a [f32],
}

/// The largest bin outside bin 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Of the values outside bin 0.
    pub share: f64,
    pub low: f32,
    pub high: f32,
}

/// Where one method clips a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    pub method: CalibrationMethod,
    pub amax: f32,
    /// amax / max; 1 for `max` itself.
    pub of_max: f64,
    /// Share of all values above amax, which saturate.
    pub clipped: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorHealth {
    pub name: String,
    pub producer: Option<Producer>,
    pub max: f32,
    /// Share of all values in bin 0 (zeros and values below one bin width).
    pub zero_share: f64,
    /// None for a dead tensor or too few values outside bin 0.
    pub peak: Option<Peak>,
    /// One per method, in `CalibrationMethod::ALL` order.
    pub clips: Vec<Clip>,
    /// Final max over the max before the last batch; infinite when the
    /// range first appeared in the last batch.
    pub growth: Option<f64>,
    /// Channels whose max of |x| is zero over the whole set.
    pub dead_channels: Vec<usize>,
    pub channels: usize,
    /// Every value zero: nothing to quantize.
    pub dead: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub samples: usize,
    /// The percentile method's p, as its amax was computed here.
    pub percentile: f64,
    pub tensors: Vec<TensorHealth>,
    pub lint: Option<SetLint>,
}

/// Judges every measured tensor and the set.
pub fn assess<'a>(
    samples: usize,
    tensors: impl IntoIterator<Item = Measured<'a>>,
    lint: Option<&SetLint>,
    percentile: f64,
) -> Health {
    Health {
        samples,
        percentile,
        tensors: tensors.into_iter().map(|t| tensor_health(&t, percentile)).collect(),
        lint: lint.cloned(),
    }
}

pub fn tensor_health(tensor: &Measured<'_>, percentile: f64) -> TensorHealth {
    let histogram = tensor.histogram;
    let total = histogram.total();
    let dead = histogram.is_dead();
    let zero_share = if total == 0 { 0.0 } else { (total - outside_bin_zero(histogram)) as f64 / total as f64 };
    let clips = CalibrationMethod::ALL
        .into_iter()
        .map(|method| {
            let amax = amax(method, histogram, percentile);
            let of_max = if histogram.max > 0.0 { f64::from(amax) / f64::from(histogram.max) } else { 0.0 };
            Clip { method, amax, of_max, clipped: clipped_share(histogram, amax) }
        })
        .collect();
    let growth = tensor.max_before_last_batch.and_then(|before| match (before, histogram.max) {
        (_, 0.0) => None,
        (0.0, _) => Some(f64::INFINITY),
        (before, after) => Some(f64::from(after) / f64::from(before)),
    });
    let dead_channels = if dead {
        Vec::new()
    } else {
        tensor.channel_max.iter().enumerate().filter(|(_, &max)| max == 0.0).map(|(c, _)| c).collect()
    };
    TensorHealth {
        name: tensor.name.to_string(),
        producer: tensor.producer.cloned(),
        max: histogram.max,
        zero_share,
        peak: peak(histogram),
        clips,
        growth,
        dead_channels,
        channels: tensor.channel_max.len(),
        dead,
    }
}

fn outside_bin_zero(histogram: &Histogram) -> u64 {
    histogram.counts.iter().skip(1).sum()
}

fn peak(histogram: &Histogram) -> Option<Peak> {
    let outside = outside_bin_zero(histogram);
    if outside < PEAK_MIN_VALUES {
        return None;
    }
    let (bin, &count) =
        histogram.counts.iter().enumerate().skip(1).max_by_key(|&(bin, &count)| (count, usize::MAX - bin))?;
    Some(Peak { share: count as f64 / outside as f64, low: histogram.edge(bin), high: histogram.edge(bin + 1) })
}

/// Share of the values above `amax`. Counts in the bin that `amax` cuts
/// are taken as spread evenly over it (only mse's amax, a bin centre,
/// cuts one; the others fall on edges).
pub fn clipped_share(histogram: &Histogram, amax: f32) -> f64 {
    let total = histogram.total();
    if total == 0 || histogram.is_dead() {
        return 0.0;
    }
    let position = f64::from(amax) / f64::from(histogram.bin_width);
    let first_whole = position.ceil() as usize;
    let mut clipped: f64 = histogram.counts.iter().skip(first_whole).map(|&c| c as f64).sum();
    let cut = position.floor() as usize;
    if cut < first_whole && cut < histogram.counts.len() {
        clipped += histogram.counts[cut] as f64 * (first_whole as f64 - position);
    }
    clipped / total as f64
}

/// Every tensor and set finding past a threshold, one sentence each.
pub fn findings(health: &Health) -> Vec<String> {
    let mut out: Vec<String> = health.tensors.iter().filter_map(tensor_finding).collect();
    if let Some(lint) = &health.lint {
        out.extend(set_findings(lint));
    }
    out
}

/// The tensor as a user finds it in the graph: its name and the node
/// that writes it.
pub fn describe(name: &str, producer: Option<&Producer>) -> String {
    match producer {
        Some(p) => format!("`{name}` (output of {} `{}`)", p.op, p.node),
        None => format!("`{name}` (graph input)"),
    }
}

fn tensor_finding(t: &TensorHealth) -> Option<String> {
    let who = describe(&t.name, t.producer.as_ref());
    if t.dead {
        return Some(format!("{who}: every value is zero over the calibration set; its scale is meaningless"));
    }
    let mut clauses = Vec::new();
    if let Some(peak) = t.peak.filter(|p| p.share > PEAK_SHARE) {
        clauses.push(format!(
            "{} of its non-zero values in one bin ({} to {})",
            percent(peak.share),
            number(f64::from(peak.low)),
            number(f64::from(peak.high))
        ));
    }
    let clipping: Vec<&Clip> = t.clips.iter().filter(|c| c.clipped > CLIPPED_SHARE).collect();
    for (i, clip) in clipping.iter().enumerate() {
        let of_max = if i == 0 { format!(" of max {}", number(f64::from(t.max))) } else { String::new() };
        clauses.push(format!(
            "{} clips at {:.2}{of_max}, {} of values",
            clip.method.name(),
            clip.of_max,
            percent(clip.clipped)
        ));
    }
    match t.growth {
        Some(g) if g.is_infinite() => clauses.push("its range first appeared in the last batch".into()),
        Some(g) if g > GROWTH => clauses.push(format!("the last batch grew its range {g:.2}x")),
        _ => {}
    }
    if !t.dead_channels.is_empty() {
        clauses.push(format!(
            "{} of {} channels are zero over the whole set ({})",
            t.dead_channels.len(),
            t.channels,
            channel_list(&t.dead_channels)
        ));
    }
    (!clauses.is_empty()).then(|| format!("{who}: {}", clauses.join("; ")))
}

fn set_findings(lint: &SetLint) -> Vec<String> {
    let mut out = Vec::new();
    if lint.duplicates > 0 {
        out.push(format!(
            "calibration set: {} sample(s) repeat an earlier one exactly; they add no range",
            lint.duplicates
        ));
    }
    if lint.constant > 0 {
        out.push(format!("calibration set: {} sample(s) are constant (every channel one value)", lint.constant));
    }
    if let Some((smallest, largest)) = lint.class_counts.as_ref().and_then(class_extremes) {
        if largest.1 as f64 > CLASS_RATIO * smallest.1 as f64 {
            out.push(format!(
                "calibration set: classes are unbalanced, class {} has {} samples and class {} has {}",
                largest.0, largest.1, smallest.0, smallest.1
            ));
        }
    }
    out
}

/// The (label, count) of the smallest and of the largest class. Labels
/// missing between the smallest and largest seen count as classes with
/// no samples.
pub fn class_extremes(counts: &BTreeMap<i64, u64>) -> Option<((i64, u64), (i64, u64))> {
    let (&first, _) = counts.first_key_value()?;
    let (&last, _) = counts.last_key_value()?;
    let all = (first..=last).map(|label| (label, counts.get(&label).copied().unwrap_or(0)));
    let smallest = all.clone().min_by_key(|&(_, n)| n)?;
    let largest = all.max_by_key(|&(_, n)| n)?;
    Some((smallest, largest))
}

/// The first few indices, then how many more.
fn channel_list(channels: &[usize]) -> String {
    const SHOWN: usize = 8;
    let shown: Vec<String> = channels.iter().take(SHOWN).map(usize::to_string).collect();
    match channels.len().saturating_sub(SHOWN) {
        0 => shown.join(", "),
        more => format!("{}, and {more} more", shown.join(", ")),
    }
}

/// A share as a percentage with the digits its size needs.
pub fn percent(share: f64) -> String {
    let p = share * 100.0;
    match p {
        0.0 => "0%".into(),
        p if p >= 10.0 => format!("{p:.0}%"),
        p if p >= 1.0 => format!("{p:.1}%"),
        p if p >= 0.01 => format!("{p:.2}%"),
        _ => "<0.01%".into(),
    }
}

/// A value of a tensor with three significant digits.
pub fn number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let digits = (2 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured<'a>(histogram: &'a Histogram, before: Option<f32>, channels: &'a [f32]) -> Measured<'a> {
        Measured { name: "t", producer: None, histogram, max_before_last_batch: before, channel_max: channels }
    }

    /// 90% of the values sit at 0.2, 9.9% spread over 0.1 to 0.5, and one
    /// in a thousand out at 1, 2, ... 10.
    fn spiked_values() -> Vec<f32> {
        let mut values = vec![0.2f32; 9000];
        values.extend((0..990).map(|i| 0.1 + i as f32 * 0.0004));
        values.extend((1..=10).map(|i| i as f32));
        values
    }

    fn spiked() -> Histogram {
        let mut h = Histogram::new();
        h.add(&spiked_values()).unwrap();
        h
    }

    #[test]
    fn a_point_mass_is_the_largest_bin_and_is_named() {
        let h = spiked();
        let health = tensor_health(&measured(&h, None, &[]), 99.99);
        let peak = health.peak.unwrap();
        assert!((peak.share - 0.9).abs() < 0.01, "{peak:?}");
        assert!(peak.low <= 0.2 && 0.2 < peak.high, "{peak:?}");
        assert_eq!(health.zero_share, 0.0);
        let said = tensor_finding(&health).unwrap();
        assert!(
            said.starts_with("`t` (graph input): 90% of its non-zero values in one bin (0.195 to 0.200)"),
            "{said}"
        );
    }

    /// Each method's clipped share is the share of the raw values above
    /// its amax; entropy, fitting the bulk, clips the outliers and max
    /// clips nothing.
    #[test]
    fn clipped_shares_count_the_values_above_amax() {
        let (values, h) = (spiked_values(), spiked());
        let health = tensor_health(&measured(&h, None, &[]), 99.99);
        for clip in &health.clips {
            let above = values.iter().filter(|&&v| v > clip.amax).count() as f64 / values.len() as f64;
            // mse's amax cuts a bin, whose count is spread; one value's worth of slack.
            assert!((clip.clipped - above).abs() <= 1.0 / values.len() as f64, "{clip:?}, raw {above}");
        }
        let clip = |m: CalibrationMethod| *health.clips.iter().find(|c| c.method == m).unwrap();
        assert_eq!((clip(CalibrationMethod::Max).of_max, clip(CalibrationMethod::Max).clipped), (1.0, 0.0));
        let entropy = clip(CalibrationMethod::Entropy);
        assert!(entropy.of_max < 0.5 && entropy.clipped > 0.0, "{entropy:?}");
        assert!(clip(CalibrationMethod::Percentile).clipped <= 1e-4 + 1e-12);
    }

    /// A method clipping above the threshold is said with its amax, max
    /// and share.
    #[test]
    fn heavy_clipping_is_said_in_words() {
        let mut values = vec![0.1f32; 900];
        values.extend([3.0f32; 100]);
        let mut h = Histogram::new();
        h.add(&values).unwrap();
        // The 80th percentile falls in the bulk's bin, below every spike value.
        let health = tensor_health(&measured(&h, None, &[]), 80.0);
        let said = tensor_finding(&health).unwrap();
        assert!(said.contains("percentile clips at 0.03"), "{said}");
        assert!(said.contains("of max 3.00") && said.contains("10% of values"), "{said}");
    }

    #[test]
    fn clipped_share_interpolates_the_cut_bin() {
        let mut h = Histogram::new();
        h.add(&[1.0; 4]).unwrap();
        h.add(&[0.5; 4]).unwrap();
        assert_eq!(clipped_share(&h, 1.0), 0.0);
        assert_eq!(clipped_share(&h, h.max * 0.75), 0.5);
        // Half a bin below the top edge: half the top bin's count.
        assert!((clipped_share(&h, h.edge(2047) + h.bin_width / 2.0) - 0.25).abs() < 1e-6);
    }

    #[test]
    fn bin_zero_is_shown_but_not_a_peak() {
        let mut values = vec![0.0f32; 9000];
        values.extend((0..2000).map(|i| i as f32 / 1000.0));
        let mut h = Histogram::new();
        h.add(&values).unwrap();
        let health = tensor_health(&measured(&h, None, &[]), 99.99);
        assert!(health.zero_share > 0.8, "{}", health.zero_share);
        assert!(health.peak.unwrap().share < 0.01);
        assert_eq!(tensor_finding(&health), None, "a ReLU-like tensor is healthy");
    }

    #[test]
    fn last_batch_growth_and_dead_channels_are_reported() {
        let mut h = Histogram::new();
        h.add(&[1.0, 0.5]).unwrap();
        h.add(&[1.5]).unwrap();
        let channels = [1.5, 0.0, 0.7, 0.0];
        let health = tensor_health(&measured(&h, Some(1.0), &channels), 99.99);
        assert_eq!(health.growth, Some(1.5));
        assert_eq!(health.dead_channels, [1, 3]);
        let said = tensor_finding(&health).unwrap();
        assert!(said.contains("the last batch grew its range 1.50x"), "{said}");
        assert!(said.contains("2 of 4 channels are zero over the whole set (1, 3)"), "{said}");

        let steady = tensor_health(&measured(&h, Some(1.45), &[1.5]), 99.99);
        assert!(steady.growth.unwrap() < GROWTH);
        assert!(!tensor_finding(&steady).unwrap_or_default().contains("grew"));
        assert_eq!(tensor_health(&measured(&h, None, &[]), 99.99).growth, None, "one batch: unknown");
        let late = tensor_health(&measured(&h, Some(0.0), &[]), 99.99);
        assert_eq!(late.growth, Some(f64::INFINITY));
    }

    #[test]
    fn a_dead_tensor_is_one_finding() {
        let mut h = Histogram::new();
        h.add(&[0.0; 64]).unwrap();
        let health = tensor_health(&measured(&h, Some(0.0), &[0.0, 0.0]), 99.99);
        assert!(health.dead && health.dead_channels.is_empty() && health.growth.is_none());
        assert!(tensor_finding(&health).unwrap().contains("every value is zero"));
    }

    #[test]
    fn set_lint_flags_duplicates_constants_and_imbalance() {
        let balanced: BTreeMap<i64, u64> = (0..10).map(|c| (c, 50)).collect();
        let healthy = SetLint { duplicates: 0, constant: 0, class_counts: Some(balanced) };
        assert!(set_findings(&healthy).is_empty());

        // Class 3 missing counts as a class with no samples.
        let skewed: BTreeMap<i64, u64> = [(0, 80), (1, 30), (2, 50), (4, 50)].into();
        let lint = SetLint { duplicates: 4, constant: 1, class_counts: Some(skewed) };
        let said = set_findings(&lint);
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(said[0].contains("4 sample(s) repeat an earlier one"));
        assert!(said[1].contains("1 sample(s) are constant"));
        assert!(said[2].contains("class 0 has 80 samples and class 3 has 0"), "{}", said[2]);
    }

    #[test]
    fn shares_and_values_print_with_the_digits_they_need() {
        assert_eq!([percent(0.61), percent(0.081), percent(0.0005), percent(0.0)], ["61%", "8.1%", "0.05%", "0%"]);
        assert_eq!([number(2.953), number(0.2104), number(123.4)], ["2.95", "0.210", "123"]);
    }
}
