//! A streaming histogram of |x|, built batch by batch so that memory stays
//! bounded by the number of bins whatever the number of samples.
//!
//! The first batch with a non-zero value fixes the bin width: 2048 bins over
//! [0, that batch's max]. A later batch that exceeds the range appends bins
//! of the same width, so counts are never rebinned and never lose
//! resolution, as pytorch_quantization's HistogramCalibrator does.

use serde::{Deserialize, Serialize};

/// Bins over the first batch's range.
pub const INITIAL_BINS: usize = 2048;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Zero until a non-zero value has been seen.
    pub bin_width: f32,
    pub counts: Vec<u64>,
    /// Running max of |x|, the `max` method's amax.
    pub max: f32,
    /// Running min of x (signed): a tensor that is never negative can use
    /// all 256 levels of an unsigned int8.
    #[serde(default)]
    pub min: f32,
    /// Values seen while all were zero, before the width was known.
    pending_zeros: u64,
}

/// A batch held NaN or infinity, which no scale can represent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    pub count: usize,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self { bin_width: 0.0, counts: Vec::new(), max: 0.0, min: 0.0, pending_zeros: 0 }
    }

    /// Adds a batch of values. Refuses NaN and infinity without adding
    /// anything, as they mean the model or data is broken.
    pub fn add(&mut self, values: &[f32]) -> Result<(), NonFinite> {
        let (batch_min, batch_max) = scan(values)?;
        self.max = self.max.max(batch_max);
        self.min = self.min.min(batch_min);
        if self.bin_width == 0.0 {
            if batch_max == 0.0 {
                self.pending_zeros += values.len() as u64;
                return Ok(());
            }
            self.bin_width = batch_max / INITIAL_BINS as f32;
            self.counts = vec![0; INITIAL_BINS];
            self.counts[0] += std::mem::take(&mut self.pending_zeros);
        }
        let needed = (batch_max / self.bin_width).ceil() as usize;
        if needed > self.counts.len() {
            self.counts.resize(needed, 0);
        }
        self.bin(values);
        Ok(())
    }

    /// Counts values into bins. Activations repeat values (post-ReLU
    /// tensors are mostly zeros), and incrementing one counter back to back
    /// stalls on the previous store, so four interleaved lanes of counters
    /// take turns and are summed at the end.
    fn bin(&mut self, values: &[f32]) {
        const LANES: usize = 4;
        let bins = self.counts.len();
        let last = bins - 1;
        let inverse_width = 1.0 / self.bin_width;
        let mut lanes = vec![0u32; LANES * bins];
        // u32 lanes cannot overflow within one block.
        for block in values.chunks(LANES << 30) {
            let mut quads = block.chunks_exact(LANES);
            for quad in &mut quads {
                for (lane, &v) in quad.iter().enumerate() {
                    let bin = ((v.abs() * inverse_width) as usize).min(last);
                    lanes[lane * bins + bin] += 1;
                }
            }
            for &v in quads.remainder() {
                lanes[((v.abs() * inverse_width) as usize).min(last)] += 1;
            }
            for (bin, count) in self.counts.iter_mut().enumerate() {
                *count += (0..LANES).map(|lane| lanes[lane * bins + bin] as u64).sum::<u64>();
            }
            lanes.fill(0);
        }
    }

    /// Every value added so far.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.pending_zeros
    }

    /// Upper edge of bin `i`.
    pub fn edge(&self, i: usize) -> f32 {
        i as f32 * self.bin_width
    }

    /// Whether every value seen was zero (or none were seen).
    pub fn is_dead(&self) -> bool {
        self.bin_width == 0.0
    }
}

/// The min and the max of |x| of a batch, or how many values are NaN or
/// infinite. Written with independent accumulators so it vectorizes.
fn scan(values: &[f32]) -> Result<(f32, f32), NonFinite> {
    const WIDTH: usize = 8;
    let (mut mins, mut maxs, mut poison) = ([0.0f32; WIDTH], [0.0f32; WIDTH], [0.0f32; WIDTH]);
    let mut chunks = values.chunks_exact(WIDTH);
    for chunk in &mut chunks {
        for i in 0..WIDTH {
            let v = chunk[i];
            mins[i] = if v < mins[i] { v } else { mins[i] };
            maxs[i] = if v.abs() > maxs[i] { v.abs() } else { maxs[i] };
            // x * 0 is 0 for finite x and NaN for NaN or infinity.
            poison[i] += v * 0.0;
        }
    }
    let mut min = mins.iter().copied().fold(0.0f32, f32::min);
    let mut max = maxs.iter().copied().fold(0.0f32, f32::max);
    let mut poisoned = poison.iter().any(|p| p.is_nan());
    for &v in chunks.remainder() {
        min = min.min(v);
        max = max.max(v.abs());
        poisoned |= !v.is_finite();
    }
    if poisoned {
        return Err(NonFinite { count: values.iter().filter(|v| !v.is_finite()).count() });
    }
    Ok((min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_nonzero_batch_fixes_2048_bins() {
        let mut h = Histogram::new();
        h.add(&[0.0, 0.0]).unwrap();
        h.add(&[-2.0, 1.0, 0.5]).unwrap();
        assert_eq!(h.counts.len(), 2048);
        assert_eq!(h.bin_width, 2.0 / 2048.0);
        assert_eq!(h.total(), 5);
        assert_eq!(h.counts[0], 2, "early zeros land in bin 0");
        assert_eq!(h.counts[2047], 1, "the max lands in the last bin");
        assert_eq!(h.counts[1024], 1);
        assert_eq!(h.min, -2.0);
    }

    /// Growth appends bins of the same width, and every count survives.
    #[test]
    fn growth_keeps_width_and_loses_no_counts() {
        let mut h = Histogram::new();
        h.add(&[1.0, 0.25]).unwrap();
        let width = h.bin_width;
        h.add(&[3.0, -2.5, 0.25]).unwrap();
        assert_eq!(h.bin_width, width);
        assert_eq!(h.counts.len(), 3 * 2048);
        assert_eq!(h.total(), 5);
        assert_eq!(h.counts[512], 2, "0.25 twice, in the same bin before and after growth");
        assert_eq!(h.counts[2047], 1, "1.0 stays in the old top bin");
        assert_eq!((h.counts[5120], h.counts[6143]), (1, 1), "2.5 and 3.0 in the new bins");
        assert_eq!(h.max, 3.0);
    }

    #[test]
    fn non_finite_values_are_refused_whole() {
        let mut h = Histogram::new();
        assert_eq!(h.add(&[1.0, f32::NAN, f32::INFINITY]), Err(NonFinite { count: 2 }));
        assert_eq!(h.total(), 0);
    }
}
