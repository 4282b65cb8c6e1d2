//! candle custom ops with their own backward pass, for what candle cannot
//! differentiate (pooling with padding or kernel != stride), cannot
//! express (fake quantization's straight-through estimator), or does too
//! slowly (convolution); the arithmetic is in `kernels`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::kernels::{self, Planes, Pooling, Quantizer, Window};

/// A contiguous f32 view of a custom op's argument.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let values = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("training ops need contiguous tensors"),
    }
}

fn values(tensor: &Tensor) -> Result<Vec<f32>> {
    tensor.flatten_all()?.to_vec1()
}

/// Runs `f` on a tensor's values without copying them when they are
/// contiguous on the CPU (copies of activations were a twentieth of a
/// training step).
fn with_values<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = tensor.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
        }
    }
    Ok(f(&values(tensor)?))
}

/// The window of an NCHW input with the op's kernel geometry.
fn window_over(shape: &Shape, geometry: &Geometry) -> Result<Window> {
    let &[batch, channels, height, width] = shape.dims() else {
        candle_core::bail!("expected an NCHW tensor, got shape {shape:?}")
    };
    Ok(Window {
        batch,
        channels,
        height,
        width,
        kernel: geometry.kernel,
        stride: geometry.stride,
        pads: geometry.pads,
        dilation: geometry.dilation,
        ceil: geometry.ceil,
    })
}

/// Kernel, strides, pads (top, left, bottom, right), dilations, ceil_mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
    pub ceil: bool,
}

/// Conv with groups 1, no bias (added after, where candle differentiates it).
pub struct Conv2d(pub Geometry);

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "qsweep-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let window = window_over(l1.shape(), &self.0)?;
        let &[out_channels, in_channels, kh, kw] = l2.shape().dims() else {
            candle_core::bail!("a Conv weight is [out, in, kh, kw], got {:?}", l2.shape())
        };
        if in_channels != window.channels || [kh, kw] != self.0.kernel {
            candle_core::bail!("Conv weight {:?} does not fit input {:?}", l2.shape(), l1.shape());
        }
        let output = kernels::conv_forward(&window, f32_slice(s1, l1)?, f32_slice(s2, l2)?, out_channels);
        let shape = Shape::from((window.batch, out_channels, window.out_height(), window.out_width()));
        Ok((CpuStorage::F32(output), shape))
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let window = window_over(input.shape(), &self.0)?;
        let out_channels = weight.dim(0)?;
        let (grad_input, grad_weight) = with_values(input, |x| {
            with_values(weight, |w| with_values(grad, |g| kernels::conv_backward(&window, x, w, out_channels, g)))
        })???;
        Ok((
            Some(Tensor::from_vec(grad_input, input.shape(), input.device())?),
            Some(Tensor::from_vec(grad_weight, weight.shape(), weight.device())?),
        ))
    }
}

/// ReLU whose backward is one pass over its output (candle's builds a
/// comparison, a cast and a product).
pub struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "qsweep-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = kernels::relu(f32_slice(storage, layout)?);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_values(output, |y| with_values(grad, |g| kernels::relu_backward(y, g)))??;
        Ok(Some(Tensor::from_vec(dx, output.shape(), output.device())?))
    }
}

/// MaxPool or AveragePool over NCHW.
pub struct Pool(pub Geometry, pub Pooling);

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        "qsweep-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let window = window_over(layout.shape(), &self.0)?;
        let output = kernels::pool_forward(&window, self.1, f32_slice(storage, layout)?);
        let shape = Shape::from((window.batch, window.channels, window.out_height(), window.out_width()));
        Ok((CpuStorage::F32(output), shape))
    }

    fn bwd(&self, input: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let window = window_over(input.shape(), &self.0)?;
        let grad_input = kernels::pool_backward(&window, self.1, &values(input)?, &values(grad)?);
        Ok(Some(Tensor::from_vec(grad_input, input.shape(), input.device())?))
    }
}

fn planes_of(shape: &Shape) -> Result<Planes> {
    match shape.dims() {
        &[batch, channels, height, width] => Ok(Planes { batch, channels, plane: height * width }),
        &[batch, channels] => Ok(Planes { batch, channels, plane: 1 }),
        _ => candle_core::bail!("expected an NCHW or NC tensor, got shape {shape:?}"),
    }
}

fn channel_vectors<'a>(
    planes: Planes,
    shape: &Shape,
    vectors: [(&'a CpuStorage, &Layout); 2],
) -> Result<[&'a [f32]; 2]> {
    let [(s1, l1), (s2, l2)] = vectors;
    let (a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
    if a.len() != planes.channels || b.len() != planes.channels {
        candle_core::bail!("per-channel vectors of {} and {} values do not fit {shape:?}", a.len(), b.len());
    }
    Ok([a, b])
}

/// y = x * a[c] + b[c] over NCHW in one pass: BatchNorm with frozen
/// statistics, and a Conv's bias; candle's broadcast ops made several.
/// With `relu`, the ReLU that follows a BatchNorm too.
pub struct ChannelAffine {
    pub relu: bool,
}

/// The gradient that reaches a fused op's affine part: zero where its ReLU
/// clipped the output.
fn through_relu(relu: bool, output: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if !relu {
        return Ok(grad.clone());
    }
    let masked = with_values(output, |y| with_values(grad, |g| kernels::relu_backward(y, g)))??;
    Tensor::from_vec(masked, grad.shape(), grad.device())
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "qsweep-channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let planes = planes_of(l1.shape())?;
        let [a, b] = channel_vectors(planes, l1.shape(), [(s2, l2), (s3, l3)])?;
        let y = kernels::channel_affine(planes, f32_slice(s1, l1)?, a, b, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let planes = planes_of(x.shape())?;
        let grad = through_relu(self.relu, output, grad)?;
        let a_values = values(a)?;
        let (dx, da, db) =
            with_values(x, |xs| with_values(&grad, |g| kernels::channel_affine_backward(planes, xs, &a_values, g)))??;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// The batch statistics a `BatchNormTrain` measured, per channel: the
/// backward pass and the running-statistics update reuse them instead of
/// reading the activations again.
pub type BatchStatistics = std::sync::Arc<std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>>;

/// BatchNormalization with batch statistics, forward and backward fused.
pub struct BatchNormTrain {
    pub epsilon: f32,
    /// Filled by the forward pass with (mean, biased variance).
    pub statistics: BatchStatistics,
    /// Applies the ReLU that follows, in the same pass.
    pub relu: bool,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "qsweep-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let planes = planes_of(l1.shape())?;
        let [scale, bias] = channel_vectors(planes, l1.shape(), [(s2, l2), (s3, l3)])?;
        let x = f32_slice(s1, l1)?;
        let (mean, var) = kernels::channel_moments(planes, x);
        let y = kernels::batch_norm(planes, x, scale, bias, (&mean, &var), self.epsilon, self.relu);
        *self.statistics.lock().expect("statistics lock") = Some((mean, var));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        bias: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let planes = planes_of(x.shape())?;
        let statistics = self.statistics.lock().expect("statistics lock").clone();
        let scale_values = values(scale)?;
        let grad = through_relu(self.relu, output, grad)?;
        let (dx, dscale, dbias) = with_values(x, |xs| {
            let moments = statistics.unwrap_or_else(|| kernels::channel_moments(planes, xs));
            with_values(&grad, |g| {
                kernels::batch_norm_backward(planes, xs, &scale_values, (&moments.0, &moments.1), self.epsilon, g)
            })
        })??;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dscale, scale.shape(), scale.device())?),
            Some(Tensor::from_vec(dbias, bias.shape(), bias.device())?),
        ))
    }
}

/// QuantizeLinear followed by DequantizeLinear, with the straight-through
/// estimator as its gradient.
pub struct FakeQuant(pub Quantizer);

impl CustomOp1 for FakeQuant {
    fn name(&self) -> &'static str {
        "qsweep-fake-quant"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.0.forward(f32_slice(storage, layout)?)), layout.shape().clone()))
    }

    fn bwd(&self, input: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad_input = self.0.backward(&values(input)?, &values(grad)?);
        Ok(Some(Tensor::from_vec(grad_input, input.shape(), input.device())?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Checks the op's gradient of sum(op(x) * probe) against central finite
    /// differences, for every input element.
    pub(crate) fn check_gradient(inputs: &[Tensor], forward: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let output = forward(&tensors).unwrap();
        let count = output.elem_count();
        let probe_values: Vec<f32> = (0..count).map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.4).collect();
        let probe = Tensor::from_vec(probe_values, output.shape(), &Device::Cpu).unwrap();
        let loss = |ts: &[Tensor]| -> f64 {
            let out = forward(ts).unwrap().to_dtype(candle_core::DType::F64).unwrap();
            (out * probe.to_dtype(candle_core::DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let grads = (output * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (n, var) in vars.iter().enumerate() {
            let analytic: Vec<f32> = values(grads.get(var).expect("a gradient")).unwrap();
            let base: Vec<f32> = values(var.as_tensor()).unwrap();
            let step = 1e-3f32;
            for i in 0..base.len() {
                let nudged = |delta: f32| {
                    let mut v = base.clone();
                    v[i] += delta;
                    let mut ts = tensors.clone();
                    ts[n] = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
                    loss(&ts)
                };
                let numeric = ((nudged(step) - nudged(-step)) / (2.0 * step as f64)) as f32;
                let tolerance = 2e-2 * (1.0 + numeric.abs());
                assert!(
                    (analytic[i] - numeric).abs() <= tolerance,
                    "input {n} element {i}: analytic {} vs numeric {numeric}",
                    analytic[i]
                );
            }
        }
    }

    fn tensor(shape: &[usize], seed: usize) -> Tensor {
        let count: usize = shape.iter().product();
        // Distinct values, so max pooling has no ties for the differences to straddle.
        let values: Vec<f32> = (0..count).map(|i| (((i + seed) * 7919) % 1009) as f32 / 100.0 - 5.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn convolution_gradients_match_finite_differences() {
        let geometry = Geometry { kernel: [3, 3], stride: [2, 1], pads: [1, 0, 1, 2], dilation: [1, 2], ceil: false };
        check_gradient(&[tensor(&[2, 2, 6, 7], 1), tensor(&[3, 2, 3, 3], 2)], |t| {
            t[0].apply_op2(&t[1], Conv2d(geometry))
        });
    }

    #[test]
    fn relu_gradient_matches_finite_differences() {
        check_gradient(&[tensor(&[2, 3, 4, 4], 9)], |t| t[0].apply_op1(Relu));
    }

    #[test]
    fn pooling_gradients_match_finite_differences() {
        // ResNet's stem pool: padding, kernel 3 != stride 2.
        let stem = Geometry { kernel: [3, 3], stride: [2, 2], pads: [1, 1, 1, 1], dilation: [1, 1], ceil: false };
        check_gradient(&[tensor(&[2, 2, 7, 7], 3)], |t| t[0].apply_op1(Pool(stem, Pooling::Max)));
        for count_include_pad in [false, true] {
            let average = Pooling::Average { count_include_pad };
            check_gradient(&[tensor(&[1, 2, 6, 5], 4)], |t| t[0].apply_op1(Pool(stem, average)));
        }
        let ceil = Geometry { kernel: [2, 2], stride: [2, 2], pads: [0; 4], dilation: [1, 1], ceil: true };
        check_gradient(&[tensor(&[1, 1, 5, 5], 5)], |t| t[0].apply_op1(Pool(ceil, Pooling::Max)));
    }

    #[test]
    fn batch_norm_and_channel_affine_gradients_match_finite_differences() {
        let (x, scale, bias) = (tensor(&[3, 2, 2, 3], 6), tensor(&[2], 7), tensor(&[2], 8));
        for relu in [false, true] {
            check_gradient(&[x.clone(), scale.clone(), bias.clone()], |t| {
                t[0].apply_op3(&t[1], &t[2], BatchNormTrain { epsilon: 1e-5, statistics: Default::default(), relu })
            });
            check_gradient(&[x.clone(), scale.clone(), bias.clone()], |t| {
                t[0].apply_op3(&t[1], &t[2], ChannelAffine { relu })
            });
        }
    }

    #[test]
    fn fake_quantization_passes_gradients_inside_the_range_only() {
        let quantizer =
            Quantizer { scales: vec![0.1, 0.2], zero_points: vec![0.0, 0.0], min: -5.0, max: 5.0, inner: 2 };
        let x =
            Tensor::from_vec(vec![0.13f32, 0.9, 0.33, -2.0, 0.05, 0.61, -0.52, 0.2], (2, 2, 2), &Device::Cpu).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let y = var.as_tensor().apply_op1(FakeQuant(quantizer.clone())).unwrap();
        // Channel 0 (scale 0.1, range +-0.5): 0.13 -> 0.1, 0.9 -> 0.5 (saturated).
        assert_eq!(values(&y).unwrap()[..2], [0.1, 0.5]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let expected: Vec<f32> = (0..8)
            .map(|i| {
                let level = quantizer.level(i, values(&x).unwrap()[i]);
                if (-5.0..=5.0).contains(&level) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(values(grads.get(&var).unwrap()).unwrap(), expected);
        // Saturated: 0.9 (9 > 5), -2.0 (-10 < -5), 0.61 (6 > 5).
        assert_eq!(expected, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
    }
}
