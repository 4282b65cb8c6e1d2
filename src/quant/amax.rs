//! The four calibration methods: each turns one histogram of |x| into the
//! amax that symmetric int8 quantization clips at. All four read the same
//! histogram, which is why one calibration pass serves every method.
//!
//! The rules follow NVIDIA's pytorch_quantization calibrators:
//! - max: the running max of |x|.
//! - percentile: the upper edge of the bin where the CDF reaches p.
//! - mse: among bin centres from bin 128 up, the one that minimises the
//!   count-weighted squared error of fake-quantizing every bin centre.
//! - entropy: TensorRT's KL-divergence search over the first i bins,
//!   i from 128 up, against those bins merged into 128 levels.

use super::histogram::Histogram;
use crate::spec::CalibrationMethod;

/// Candidates start here: fewer bins than int8 levels cannot be better.
const START_BIN: usize = 128;
/// Levels on one side of symmetric int8 (narrow range: -127..=127).
const LEVELS: usize = 128;
const QMAX: f32 = 127.0;

pub fn amax(method: CalibrationMethod, histogram: &Histogram, percentile: f64) -> f32 {
    if histogram.is_dead() {
        return 0.0;
    }
    match method {
        CalibrationMethod::Max => histogram.max,
        CalibrationMethod::Percentile => percentile_amax(histogram, percentile),
        CalibrationMethod::Mse => mse_amax(histogram),
        CalibrationMethod::Entropy => entropy_amax(histogram),
    }
}

fn percentile_amax(histogram: &Histogram, percentile: f64) -> f32 {
    let total = histogram.total() as f64;
    let target = percentile / 100.0;
    let mut cumulative = 0u64;
    for (i, &count) in histogram.counts.iter().enumerate() {
        cumulative += count;
        if cumulative as f64 / total >= target {
            return histogram.edge(i + 1);
        }
    }
    histogram.edge(histogram.counts.len())
}

/// Symmetric int8 fake quantization: round half to even, as torch does.
fn fake_quantize(x: f32, amax: f32) -> f32 {
    let scale = QMAX / amax;
    (x * scale).round_ties_even().clamp(-QMAX, QMAX) / scale
}

fn mse_amax(histogram: &Histogram) -> f32 {
    let centres: Vec<f32> = (0..histogram.counts.len()).map(|i| (i as f32 + 0.5) * histogram.bin_width).collect();
    let mut best = (f64::INFINITY, histogram.max);
    for &candidate in centres.iter().skip(START_BIN) {
        let error: f64 = centres
            .iter()
            .zip(&histogram.counts)
            .filter(|(_, &count)| count > 0)
            .map(|(&c, &count)| {
                let diff = (fake_quantize(c, candidate) - c) as f64;
                diff * diff * count as f64
            })
            .sum();
        if error < best.0 {
            best = (error, candidate);
        }
    }
    best.1
}

/// TensorRT's search, in O(bins x 128) rather than O(bins^2): within one
/// level of Q every non-empty bin has the same value, so each level's share
/// of the divergence follows from prefix sums of c, of [c > 0] and of c ln c.
fn entropy_amax(histogram: &Histogram) -> f32 {
    let mut bins: Vec<f64> = histogram.counts.iter().map(|&c| c as f64).collect();
    let n = bins.len();
    if n <= START_BIN {
        return histogram.max;
    }
    // Like TensorRT and pytorch_quantization, ignore the spike at zero
    // (post-ReLU tensors are mostly zeros) by copying its neighbour.
    bins[0] = bins[1];
    let (mut count, mut nonzero, mut c_ln_c) = (vec![0.0f64; n + 1], vec![0usize; n + 1], vec![0.0f64; n + 1]);
    for (j, &c) in bins.iter().enumerate() {
        count[j + 1] = count[j] + c;
        nonzero[j + 1] = nonzero[j] + usize::from(c > 0.0);
        c_ln_c[j + 1] = c_ln_c[j] + if c > 0.0 { c * c.ln() } else { 0.0 };
    }
    let total = count[n];
    let x_ln_x = |x: f64| if x > 0.0 { x * x.ln() } else { 0.0 };

    let mut best = (f64::INFINITY, n);
    for i in START_BIN..=n {
        // P: the first i bins, the outliers beyond folded into the last.
        // Q: P's bins merged into 128 levels, each level's mass spread
        // evenly over its non-empty bins.
        let outliers = total - count[i];
        let kept = count[i];
        let last = bins[i - 1];
        if last == 0.0 && outliers > 0.0 {
            continue; // P has mass where Q has none: infinite divergence.
        }
        // Sum over non-empty bins of c ln(c / q_raw), q_raw = mass / members.
        let mut sum = 0.0;
        let mut last_q = 0.0;
        for level in 0..LEVELS {
            let (a, b) = (level_start(level, i), level_start(level + 1, i));
            let members = nonzero[b] - nonzero[a];
            if members == 0 {
                continue;
            }
            let mass = count[b] - count[a];
            let q = mass / members as f64;
            sum += (c_ln_c[b] - c_ln_c[a]) - mass * q.ln();
            if (a..b).contains(&(i - 1)) {
                last_q = q;
            }
        }
        // Swap the last bin's term for its folded count.
        if outliers > 0.0 {
            sum += x_ln_x(last + outliers) - (last + outliers) * last_q.ln() - (x_ln_x(last) - last * last_q.ln());
        }
        // KL(P || Q) with P normalised by `total` and Q by `kept`.
        let divergence = sum / total + (kept / total).ln();
        // Ties go to the larger range, as in TensorRT.
        if divergence <= best.0 {
            best = (divergence, i);
        }
    }
    histogram.edge(best.1)
}

/// The first bin of `level` when `bins` bins are merged into LEVELS levels
/// (bin j belongs to level floor(j * LEVELS / bins)).
fn level_start(level: usize, bins: usize) -> usize {
    (level * bins).div_ceil(LEVELS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_quantization_rounds_half_to_even_and_clamps() {
        assert_eq!(fake_quantize(0.5 / 127.0 * 2.0, 2.0), 0.0);
        assert_eq!(fake_quantize(10.0, 2.0), 2.0);
        assert_eq!(fake_quantize(-10.0, 2.0), -2.0);
    }

    #[test]
    fn a_dead_tensor_has_zero_amax_for_every_method() {
        let mut h = Histogram::new();
        h.add(&[0.0; 16]).unwrap();
        for method in CalibrationMethod::ALL {
            assert_eq!(amax(method, &h, 99.99), 0.0);
        }
    }
}

/// Checks every method against the independent numpy computations in
/// tests/fixtures/calibration (see make_expected.py there).
#[cfg(test)]
mod reference_tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn matches_the_numpy_reference_on_synthetic_distributions() {
        let fixture: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/calibration/expected.json")).unwrap();
        let percentile = fixture["percentile"].as_f64().unwrap();
        for case in fixture["cases"].as_array().unwrap() {
            let max = case["max"].as_f64().unwrap() as f32;
            let histogram: Histogram = serde_json::from_value(serde_json::json!({
                "bin_width": max / 2048.0,
                "counts": case["counts"],
                "max": max,
                "pending_zeros": 0,
            }))
            .unwrap();
            for method in CalibrationMethod::ALL {
                let expected = case["expected"][method.name()].as_f64().unwrap() as f32;
                let got = amax(method, &histogram, percentile);
                assert!(
                    (got - expected).abs() <= expected * 1e-5,
                    "{} {}: qsweep {got}, numpy {expected}",
                    case["name"],
                    method.name()
                );
            }
        }
    }
}
