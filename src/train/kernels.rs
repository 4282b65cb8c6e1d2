//! The numeric kernels of training, on plain slices in NCHW order:
//! convolution forward and backward through im2col and GEMM, pooling with
//! padding and any kernel/stride, and fake quantization.
//!
//! Why our own convolution: candle's conv2d backward goes through
//! conv_transpose2d, which measured 3.4x its forward pass here, and made
//! training 10x slower than PyTorch. Here every pass is one GEMM per image
//! on the `gemm` crate (the one candle's matmul uses), with images spread
//! over rayon's threads; the input gradient is W^T x dY scattered back by
//! col2im, the weight gradient dY x cols^T.

use gemm::Parallelism;
use rayon::prelude::*;

/// The shape of a 2-D convolution or pooling window over an NCHW input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Top, left, bottom, right (ONNX order is top, left, bottom, right too).
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
    /// Pooling's ceil_mode: a last partial window still yields an output.
    pub ceil: bool,
}

impl Window {
    pub fn out_height(&self) -> usize {
        self.out_size(self.height, self.pads[0] + self.pads[2], 0)
    }

    pub fn out_width(&self) -> usize {
        self.out_size(self.width, self.pads[1] + self.pads[3], 1)
    }

    fn out_size(&self, size: usize, pad: usize, axis: usize) -> usize {
        let span = self.dilation[axis] * (self.kernel[axis] - 1) + 1;
        let room = (size + pad).saturating_sub(span);
        let steps = if self.ceil { room.div_ceil(self.stride[axis]) } else { room / self.stride[axis] };
        let mut out = steps + 1;
        // ceil_mode never starts a window inside the end padding.
        if self.ceil && (out - 1) * self.stride[axis] >= size + self.pads[axis] {
            out -= 1;
        }
        out
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn positions(&self) -> usize {
        self.out_height() * self.out_width()
    }

    /// Rows of the im2col matrix: one per (channel, kernel row, kernel column).
    fn patch_len(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// The input coordinate that kernel tap (kh, kw) reads for output
    /// (oh, ow), or None in the padding.
    #[inline]
    fn source(&self, oh: usize, ow: usize, kh: usize, kw: usize) -> Option<(usize, usize)> {
        let ih = (oh * self.stride[0] + kh * self.dilation[0]).checked_sub(self.pads[0])?;
        let iw = (ow * self.stride[1] + kw * self.dilation[1]).checked_sub(self.pads[1])?;
        (ih < self.height && iw < self.width).then_some((ih, iw))
    }
}

impl Window {
    /// The output columns whose input column for kernel column `kw` lies
    /// inside the image, and that first input column (possibly negative).
    #[inline]
    fn valid_columns(&self, kw: usize) -> (usize, usize, isize) {
        let out_w = self.out_width();
        let first = (kw * self.dilation[1]) as isize - self.pads[1] as isize;
        let stride = self.stride[1] as isize;
        let lo = if first >= 0 { 0 } else { ((-first) + stride - 1) / stride } as usize;
        let last = self.width as isize - 1 - first;
        let hi = if last < 0 { 0 } else { ((last / stride) as usize + 1).min(out_w) };
        (lo.min(hi), hi, first)
    }

    /// The input row that kernel row `kh` reads for output row `oh`, if inside.
    #[inline]
    fn source_row(&self, oh: usize, kh: usize) -> Option<usize> {
        let ih = (oh * self.stride[0] + kh * self.dilation[0]).checked_sub(self.pads[0])?;
        (ih < self.height).then_some(ih)
    }
}

/// cols[patch_row, position] = the input value each output position sees.
/// Row by row, with the in-bounds columns worked out once per kernel tap:
/// the naive per-element bounds check was a fifth of a training step.
fn im2col(window: &Window, image: &[f32], cols: &mut [f32]) {
    let (out_h, out_w, positions) = (window.out_height(), window.out_width(), window.positions());
    let stride = window.stride[1];
    for c in 0..window.channels {
        let plane = &image[c * window.height * window.width..(c + 1) * window.height * window.width];
        for kh in 0..window.kernel[0] {
            for kw in 0..window.kernel[1] {
                let row = (c * window.kernel[0] + kh) * window.kernel[1] + kw;
                let (lo, hi, first) = window.valid_columns(kw);
                let dst = &mut cols[row * positions..(row + 1) * positions];
                for oh in 0..out_h {
                    let out = &mut dst[oh * out_w..(oh + 1) * out_w];
                    let Some(ih) = window.source_row(oh, kh) else {
                        out.fill(0.0);
                        continue;
                    };
                    let src = &plane[ih * window.width..(ih + 1) * window.width];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    let start = (first + (lo * stride) as isize) as usize;
                    if stride == 1 {
                        out[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                    } else {
                        for (i, value) in out[lo..hi].iter_mut().enumerate() {
                            *value = src[start + i * stride];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of im2col: adds each column entry back to the input value it came from.
fn col2im(window: &Window, cols: &[f32], image: &mut [f32]) {
    let (out_h, out_w, positions) = (window.out_height(), window.out_width(), window.positions());
    let stride = window.stride[1];
    for c in 0..window.channels {
        let plane = &mut image[c * window.height * window.width..(c + 1) * window.height * window.width];
        for kh in 0..window.kernel[0] {
            for kw in 0..window.kernel[1] {
                let row = (c * window.kernel[0] + kh) * window.kernel[1] + kw;
                let (lo, hi, first) = window.valid_columns(kw);
                let src = &cols[row * positions..(row + 1) * positions];
                for oh in 0..out_h {
                    let Some(ih) = window.source_row(oh, kh) else { continue };
                    let dst = &mut plane[ih * window.width..(ih + 1) * window.width];
                    let start = (first + (lo * stride) as isize) as usize;
                    for (i, value) in src[oh * out_w + lo..oh * out_w + hi].iter().enumerate() {
                        dst[start + i * stride] += value;
                    }
                }
            }
        }
    }
}

/// A row-major matrix operand: its data and whether to read it transposed.
struct Operand<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl Operand<'_> {
    /// (row stride, column stride) of the logical matrix; `rows` and
    /// `cols` describe the stored matrix.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.cols as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// dst[m x n] (+)= lhs[m x k] * rhs[k x n], single-threaded: the callers
/// already spread images over the threads.
fn matmul(dst: &mut [f32], accumulate: bool, lhs: Operand<'_>, rhs: Operand<'_>, m: usize, n: usize, k: usize) {
    let logical = |o: &Operand<'_>| if o.transposed { (o.cols, o.rows) } else { (o.rows, o.cols) };
    assert_eq!((logical(&lhs), logical(&rhs)), ((m, k), (k, n)), "operand shapes");
    assert!(dst.len() >= m * n && lhs.data.len() >= m * k && rhs.data.len() >= k * n);
    let (lhs_rs, lhs_cs) = lhs.strides();
    let (rhs_rs, rhs_cs) = rhs.strides();
    // SAFETY: the asserts above bound every index the strides reach, and
    // `dst` does not alias the operands (it is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Images per rayon job: one even share per thread, so each thread sets up
/// its column buffer (and weight-gradient accumulator) once, not per image.
fn images_per_thread(batch: usize) -> usize {
    batch.div_ceil(rayon::current_num_threads()).max(1)
}

/// y[b, o] = W[o] * x[b] for every image; W is [out_channels, patch].
pub fn conv_forward(window: &Window, input: &[f32], weight: &[f32], out_channels: usize) -> Vec<f32> {
    let (positions, patch) = (window.positions(), window.patch_len());
    let mut output = vec![0.0; window.batch * out_channels * positions];
    output
        .par_chunks_mut(out_channels * positions)
        .zip(input.par_chunks(window.image_len()))
        .with_min_len(images_per_thread(window.batch))
        .for_each_init(
            || vec![0.0; patch * positions],
            |cols, (out, image)| {
                im2col(window, image, cols);
                let w = Operand { data: weight, rows: out_channels, cols: patch, transposed: false };
                let c = Operand { data: cols, rows: patch, cols: positions, transposed: false };
                matmul(out, false, w, c, out_channels, positions, patch);
            },
        );
    output
}

/// The input and weight gradients of `conv_forward`, from the output's.
pub fn conv_backward(
    window: &Window,
    input: &[f32],
    weight: &[f32],
    out_channels: usize,
    grad_output: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (positions, patch) = (window.positions(), window.patch_len());
    let mut grad_input = vec![0.0; input.len()];
    let grad_weight = grad_input
        .par_chunks_mut(window.image_len())
        .zip(input.par_chunks(window.image_len()))
        .zip(grad_output.par_chunks(out_channels * positions))
        .with_min_len(images_per_thread(window.batch))
        .fold(
            || (vec![0.0; out_channels * patch], vec![0.0; patch * positions]),
            |(mut grad_weight, mut cols), ((grad_image, image), grad_out)| {
                im2col(window, image, &mut cols);
                let dy = || Operand { data: grad_out, rows: out_channels, cols: positions, transposed: false };
                // dW += dY [O x P] * cols^T [P x K]
                let cols_t = Operand { data: &cols, rows: patch, cols: positions, transposed: true };
                matmul(&mut grad_weight, true, dy(), cols_t, out_channels, patch, positions);
                // dcols = W^T [K x O] * dY [O x P], then back to the image.
                let weight_t = Operand { data: weight, rows: out_channels, cols: patch, transposed: true };
                matmul(&mut cols, false, weight_t, dy(), patch, positions, out_channels);
                col2im(window, &cols, grad_image);
                (grad_weight, cols)
            },
        )
        .map(|(grad_weight, _)| grad_weight)
        .reduce(|| vec![0.0; out_channels * patch], |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect());
    (grad_input, grad_weight)
}

/// How a pooling window reduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Max,
    /// Average; `count_include_pad` divides by the whole kernel area.
    Average {
        count_include_pad: bool,
    },
}

/// Visits each output of one channel plane with its window's in-bounds taps.
fn for_each_window(window: &Window, mut visit: impl FnMut(usize, &mut dyn Iterator<Item = usize>, usize)) {
    let (out_h, out_w) = (window.out_height(), window.out_width());
    for oh in 0..out_h {
        for ow in 0..out_w {
            let mut taps = (0..window.kernel[0]).flat_map(move |kh| {
                (0..window.kernel[1])
                    .filter_map(move |kw| window.source(oh, ow, kh, kw).map(|(ih, iw)| ih * window.width + iw))
            });
            // The area ceil_mode windows cover stops at the padded input.
            let rows = (oh * window.stride[0] + window.kernel[0]).min(window.height + window.pads[0] + window.pads[2])
                - oh * window.stride[0];
            let cols = (ow * window.stride[1] + window.kernel[1]).min(window.width + window.pads[1] + window.pads[3])
                - ow * window.stride[1];
            visit(oh * out_w + ow, &mut taps, rows * cols);
        }
    }
}

pub fn pool_forward(window: &Window, pooling: Pooling, input: &[f32]) -> Vec<f32> {
    let plane = window.height * window.width;
    let positions = window.positions();
    let mut output = vec![0.0; window.batch * window.channels * positions];
    output.par_chunks_mut(positions).zip(input.par_chunks(plane)).for_each(|(out, image)| {
        for_each_window(window, |o, taps, area| {
            out[o] = match pooling {
                Pooling::Max => taps.map(|i| image[i]).fold(f32::NEG_INFINITY, f32::max),
                Pooling::Average { count_include_pad } => {
                    let (sum, count) = taps.fold((0.0, 0usize), |(s, n), i| (s + image[i], n + 1));
                    sum / if count_include_pad { area } else { count.max(1) } as f32
                }
            };
        });
    });
    output
}

/// The input gradient of `pool_forward`: max sends each output's gradient
/// to its (first) largest input, average spreads it over the window.
pub fn pool_backward(window: &Window, pooling: Pooling, input: &[f32], grad_output: &[f32]) -> Vec<f32> {
    let plane = window.height * window.width;
    let positions = window.positions();
    let mut grad_input = vec![0.0; input.len()];
    grad_input.par_chunks_mut(plane).zip(input.par_chunks(plane)).zip(grad_output.par_chunks(positions)).for_each(
        |((grad_image, image), grad_out)| {
            for_each_window(window, |o, taps, area| match pooling {
                Pooling::Max => {
                    let best = taps.fold(None, |best: Option<usize>, i| match best {
                        Some(b) if image[b] >= image[i] => Some(b),
                        _ => Some(i),
                    });
                    if let Some(b) = best {
                        grad_image[b] += grad_out[o];
                    }
                }
                Pooling::Average { count_include_pad } => {
                    let taps: Vec<usize> = taps.collect();
                    let divisor = if count_include_pad { area } else { taps.len().max(1) } as f32;
                    for i in taps {
                        grad_image[i] += grad_out[o] / divisor;
                    }
                }
            });
        },
    );
    grad_input
}

pub fn relu(x: &[f32]) -> Vec<f32> {
    x.par_iter().map(|v| v.max(0.0)).collect()
}

/// ReLU's gradient from its output: it passes where the output is positive.
pub fn relu_backward(y: &[f32], g: &[f32]) -> Vec<f32> {
    y.par_iter().zip(g).map(|(y, g)| if *y > 0.0 { *g } else { 0.0 }).collect()
}

/// An NCHW tensor's layout, for per-channel work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planes {
    pub batch: usize,
    pub channels: usize,
    /// Height times width.
    pub plane: usize,
}

impl Planes {
    /// The elements of channel `c`, image by image.
    fn channel<'a>(&self, values: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (channels, plane) = (self.channels, self.plane);
        (0..self.batch).map(move |n| &values[(n * channels + c) * plane..(n * channels + c + 1) * plane])
    }

    fn count(&self) -> f32 {
        (self.batch * self.plane) as f32
    }
}

/// Mean and biased variance of each channel (two passes, for accuracy).
pub fn channel_moments(planes: Planes, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    (0..planes.channels)
        .into_par_iter()
        .map(|c| {
            let mean = planes.channel(x, c).flatten().sum::<f32>() / planes.count();
            let var = planes.channel(x, c).flatten().map(|v| (v - mean) * (v - mean)).sum::<f32>() / planes.count();
            (mean, var)
        })
        .unzip()
}

/// y = x * a[c] + b[c], then max(y, 0) when `relu`.
pub fn channel_affine(planes: Planes, x: &[f32], a: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
    let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
    let mut y = vec![0.0; x.len()];
    y.par_chunks_mut(planes.plane).zip(x.par_chunks(planes.plane)).enumerate().for_each(|(i, (out, input))| {
        let c = i % planes.channels;
        for (o, v) in out.iter_mut().zip(input) {
            *o = (v * a[c] + b[c]).max(floor);
        }
    });
    y
}

/// Per channel: sum of g, and sum of g * x.
fn channel_sums(planes: Planes, x: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
    (0..planes.channels)
        .into_par_iter()
        .map(|c| {
            planes.channel(g, c).zip(planes.channel(x, c)).fold((0.0, 0.0), |(sum_g, sum_gx), (gs, xs)| {
                let (dg, dgx) = gs.iter().zip(xs).fold((0.0, 0.0), |(s, sx), (g, x)| (s + g, sx + g * x));
                (sum_g + dg, sum_gx + dgx)
            })
        })
        .unzip()
}

/// Gradients of `channel_affine`: (dx, da, db).
pub fn channel_affine_backward(planes: Planes, x: &[f32], a: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (db, da) = channel_sums(planes, x, g);
    let zeros = vec![0.0; planes.channels];
    (channel_affine(planes, g, a, &zeros, false), da, db)
}

/// BatchNormalization with batch statistics: y = (x - mean) / sqrt(var + eps) * scale + bias.
/// `moments` are the batch's (mean, biased variance) per channel; `relu`
/// applies a ReLU to the result.
pub fn batch_norm(
    planes: Planes,
    x: &[f32],
    scale: &[f32],
    bias: &[f32],
    (mean, var): (&[f32], &[f32]),
    epsilon: f32,
    relu: bool,
) -> Vec<f32> {
    let multiplier: Vec<f32> = (0..planes.channels).map(|c| scale[c] / (var[c] + epsilon).sqrt()).collect();
    let shift: Vec<f32> = (0..planes.channels).map(|c| bias[c] - mean[c] * multiplier[c]).collect();
    channel_affine(planes, x, &multiplier, &shift, relu)
}

/// Gradients of `batch_norm` through the batch statistics: (dx, dscale, dbias).
pub fn batch_norm_backward(
    planes: Planes,
    x: &[f32],
    scale: &[f32],
    (mean, var): (&[f32], &[f32]),
    epsilon: f32,
    g: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + epsilon).sqrt()).collect();
    let (sum_g, sum_gx) = channel_sums(planes, x, g);
    // dscale = sum(g * xhat) with xhat = (x - mean) * inv_std.
    let dscale: Vec<f32> = (0..planes.channels).map(|c| (sum_gx[c] - mean[c] * sum_g[c]) * inv_std[c]).collect();
    let count = planes.count();
    // dx = scale * inv_std * (g - sum_g / M - xhat * dscale / M)
    //    = g * a[c] + x * b[c] + k[c], with a, b, k per channel:
    let a: Vec<f32> = (0..planes.channels).map(|c| scale[c] * inv_std[c]).collect();
    let b: Vec<f32> = (0..planes.channels).map(|c| -a[c] * inv_std[c] * dscale[c] / count).collect();
    let k: Vec<f32> = (0..planes.channels).map(|c| -a[c] * sum_g[c] / count - b[c] * mean[c]).collect();
    let mut dx = vec![0.0; x.len()];
    dx.par_chunks_mut(planes.plane)
        .zip(g.par_chunks(planes.plane))
        .zip(x.par_chunks(planes.plane))
        .enumerate()
        .for_each(|(i, ((out, gs), xs))| {
            let c = i % planes.channels;
            for ((o, g), x) in out.iter_mut().zip(gs).zip(xs) {
                *o = g * a[c] + x * b[c] + k[c];
            }
        });
    (dx, dscale, sum_g)
}

/// Linear quantization of one tensor, per tensor or per channel, as ONNX's
/// QuantizeLinear followed by DequantizeLinear computes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantizer {
    /// One scale and zero point per channel (one in all for per tensor).
    pub scales: Vec<f32>,
    pub zero_points: Vec<f32>,
    /// The integer range: the storage type's, or narrower (7-bit weights).
    pub min: f32,
    pub max: f32,
    /// Elements per channel step: the product of dimensions after the axis.
    pub inner: usize,
}

impl Quantizer {
    #[inline]
    fn channel(&self, flat: usize) -> usize {
        if self.scales.len() == 1 {
            0
        } else {
            (flat / self.inner) % self.scales.len()
        }
    }

    /// The integer a value quantizes to before saturation (ties to even, as ONNX rounds).
    #[inline]
    pub fn level(&self, flat: usize, value: f32) -> f32 {
        let c = self.channel(flat);
        (value / self.scales[c]).round_ties_even() + self.zero_points[c]
    }

    /// The real value an integer level stands for.
    #[inline]
    pub fn dequantize(&self, flat: usize, level: f32) -> f32 {
        let c = self.channel(flat);
        (level - self.zero_points[c]) * self.scales[c]
    }

    /// quantize then dequantize.
    pub fn forward(&self, values: &[f32]) -> Vec<f32> {
        values
            .par_iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = self.channel(i);
                (self.level(i, v).clamp(self.min, self.max) - self.zero_points[c]) * self.scales[c]
            })
            .collect()
    }

    /// The straight-through estimator: the gradient passes where the value
    /// lies inside the representable range and is zero where it saturated.
    pub fn backward(&self, values: &[f32], grad_output: &[f32]) -> Vec<f32> {
        values
            .par_iter()
            .zip(grad_output)
            .enumerate()
            .map(|(i, (&v, &g))| {
                let level = self.level(i, v);
                if (self.min..=self.max).contains(&level) {
                    g
                } else {
                    0.0
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(height: usize, width: usize, kernel: usize, stride: usize, pad: usize, ceil: bool) -> Window {
        Window {
            batch: 1,
            channels: 1,
            height,
            width,
            kernel: [kernel; 2],
            stride: [stride; 2],
            pads: [pad; 4],
            dilation: [1, 1],
            ceil,
        }
    }

    #[test]
    fn output_sizes_follow_onnx() {
        // ResNet's stem pool: 3x3, stride 2, pad 1 on 112 -> 56.
        assert_eq!(window(112, 112, 3, 2, 1, false).out_height(), 56);
        // ceil_mode: 5 wide, kernel 2, stride 2 -> 3 (floor gives 2).
        assert_eq!(window(5, 5, 2, 2, 0, true).out_width(), 3);
        assert_eq!(window(5, 5, 2, 2, 0, false).out_width(), 2);
    }

    #[test]
    fn convolution_matches_the_direct_sum() {
        let w = Window { batch: 2, channels: 2, ..window(5, 4, 3, 2, 1, false) };
        let input: Vec<f32> = (0..w.batch * w.image_len()).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let weight: Vec<f32> = (0..3 * w.patch_len()).map(|i| ((i * 5) % 7) as f32 - 3.0).collect();
        let output = conv_forward(&w, &input, &weight, 3);
        let (oh, ow) = (w.out_height(), w.out_width());
        for b in 0..2 {
            for o in 0..3 {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut sum = 0.0;
                        for c in 0..2 {
                            for kh in 0..3 {
                                for kw in 0..3 {
                                    if let Some((ih, iw)) = w.source(y, x, kh, kw) {
                                        sum += input[((b * 2 + c) * 5 + ih) * 4 + iw]
                                            * weight[((o * 2 + c) * 3 + kh) * 3 + kw];
                                    }
                                }
                            }
                        }
                        assert_eq!(output[((b * 3 + o) * oh + y) * ow + x], sum);
                    }
                }
            }
        }
    }

    #[test]
    fn fake_quantization_saturates_and_rounds_ties_to_even() {
        let q = Quantizer { scales: vec![0.5], zero_points: vec![0.0], min: -4.0, max: 3.0, inner: 1 };
        assert_eq!(q.forward(&[0.25, 0.75, 1.2, 5.0, -9.0]), [0.0, 1.0, 1.0, 1.5, -2.0]);
        assert_eq!(q.backward(&[0.25, 5.0, -9.0, 1.74], &[1.0; 4]), [1.0, 0.0, 0.0, 1.0]);
    }
}
