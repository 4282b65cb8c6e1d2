//! The training loop: seeded shuffles, SGD with momentum under a
//! half-cosine learning-rate decay, a checkpoint after every epoch (so a
//! killed run resumes from its last finished epoch), and a NaN guard that
//! stops at the step it happened and keeps the last good checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::network::{predictions, Network};
use super::TrainError;
use crate::data::prepared::PreparedSet;

/// How to train: NVIDIA's QAT recipe is about 10% of the original epochs
/// at about 1% of the original learning rate, decayed by a half cosine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub epochs: u32,
    pub learning_rate: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub seed: u64,
    /// Random 2-pixel shifts and horizontal flips of each training image.
    #[serde(default)]
    pub augment: bool,
}

impl Recipe {
    /// The recipe a spec's `model.train` (or `qsweep train`'s flags) asks for.
    pub fn of(train: &crate::spec::TrainSpec) -> Self {
        Recipe {
            epochs: train.epochs,
            learning_rate: train.learning_rate,
            momentum: 0.9,
            weight_decay: train.weight_decay,
            batch_size: train.batch_size as usize,
            seed: train.seed,
            augment: train.augment,
        }
    }

    /// The learning rate at `step` of `total`: lr0 * (1 + cos(pi t / T)) / 2.
    pub fn learning_rate_at(&self, step: usize, total: usize) -> f64 {
        let progress = step as f64 / total.max(1) as f64;
        self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// Labelled images in NCHW order.
pub struct Examples {
    rows: Rows,
    /// Channels, height, width of one image.
    pub image_shape: [usize; 3],
    pub labels: Vec<u32>,
}

/// Where the images are.
enum Rows {
    /// Preprocessed in memory (an IDX split, for `qsweep train`).
    Memory(Vec<f32>),
    /// Read from prepare-data's shards as each batch is drawn, so memory
    /// holds a batch, not the training set.
    Prepared(std::sync::Arc<PreparedSet>),
}

impl From<crate::data::Tensors> for Examples {
    /// The preprocessed images and labels of a split.
    fn from(tensors: crate::data::Tensors) -> Self {
        let &[_, c, h, w] = tensors.images.shape() else { unreachable!("an Array4 has four dimensions") };
        Self {
            rows: Rows::Memory(tensors.images.iter().copied().collect()),
            image_shape: [c, h, w],
            labels: tensors.labels.iter().map(|&l| l as u32).collect(),
        }
    }
}

impl Examples {
    /// The labelled NCHW images of prepared data.
    pub fn prepared(set: std::sync::Arc<PreparedSet>) -> Result<Self, TrainError> {
        let &[c, h, w] = set.sample_shape() else {
            return Err(TrainError::Model(format!("training images of shape {:?} are not CHW", set.sample_shape())));
        };
        let labels = set.labels()?;
        let labels = labels.ok_or_else(|| TrainError::Model("the training samples have no labels".into()))?;
        Ok(Self {
            image_shape: [c, h, w],
            labels: labels.iter().map(|&l| l as u32).collect(),
            rows: Rows::Prepared(set),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images and labels at `indices`, as a batch.
    pub fn batch(&self, indices: &[usize]) -> Result<(Tensor, Tensor), TrainError> {
        let images = match &self.rows {
            Rows::Memory(values) => {
                let size: usize = self.image_shape.iter().product();
                let mut images = Vec::with_capacity(indices.len() * size);
                for &i in indices {
                    images.extend_from_slice(&values[i * size..(i + 1) * size]);
                }
                images
            }
            Rows::Prepared(set) => set.read(indices)?.into_raw_vec_and_offset().0,
        };
        let [c, h, w] = self.image_shape;
        let images = Tensor::from_vec(images, (indices.len(), c, h, w), &Device::Cpu)?;
        let labels: Vec<u32> = indices.iter().map(|&i| self.labels[i]).collect();
        Ok((images, Tensor::new(labels, &Device::Cpu)?))
    }
}

impl Examples {
    /// A batch with each image shifted by up to 2 pixels each way (the
    /// uncovered border takes the image's background, its smallest value)
    /// and flipped left-right half the time.
    pub fn augmented_batch(&self, indices: &[usize], rng: &mut impl rand::Rng) -> Result<(Tensor, Tensor), TrainError> {
        let (images, labels) = self.batch(indices)?;
        let [c, h, w] = self.image_shape;
        let mut values: Vec<f32> = images.flatten_all()?.to_vec1()?;
        for image in values.chunks_mut(c * h * w) {
            let (dy, dx) = (rng.random_range(-2i64..=2), rng.random_range(-2i64..=2));
            let flip = rng.random_bool(0.5);
            let source = image.to_vec();
            let background = source.iter().copied().fold(f32::INFINITY, f32::min);
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let sx = if flip { w - 1 - x } else { x } as i64 - dx;
                        let sy = y as i64 - dy;
                        let inside = (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx);
                        image[(ch * h + y) * w + x] =
                            if inside { source[(ch * h + sy as usize) * w + sx as usize] } else { background };
                    }
                }
            }
        }
        Ok((Tensor::from_vec(values, images.shape(), &Device::Cpu)?, labels))
    }
}

/// One step's report, for the progress display.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub epoch: u32,
    pub step: usize,
    pub steps_per_epoch: usize,
    pub loss: f32,
    pub learning_rate: f64,
    pub images_per_s: f64,
}

impl Step {
    /// Whether a stage's progress line should hear of this step: every
    /// tenth step and each epoch's last.
    pub fn worth_reporting(&self) -> bool {
        self.step == self.steps_per_epoch || self.step.is_multiple_of(10)
    }

    /// "epoch 1/2 step 40/78 loss 0.2060 lr 1.46e-4 276 img/s".
    pub fn describe(&self, epochs: u32) -> String {
        format!(
            "epoch {}/{epochs} step {}/{} loss {:.4} lr {:.2e} {:.0} img/s",
            self.epoch, self.step, self.steps_per_epoch, self.loss, self.learning_rate, self.images_per_s
        )
    }
}

/// What a finished training reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Mean training loss of each epoch.
    pub epoch_losses: Vec<f32>,
    /// Epochs restored from a checkpoint instead of trained again.
    pub resumed_epochs: u32,
    pub images_per_s: f64,
}

/// Where the checkpoint of one training lives, and what it says.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    recipe: Recipe,
    epochs_done: u32,
    epoch_losses: Vec<f32>,
}

const STATE: &str = "state.json";
const TENSORS: &str = "tensors.safetensors";

/// SGD with momentum and decoupled-from-nothing L2 weight decay (on weights only).
struct Sgd {
    velocity: HashMap<String, Tensor>,
}

impl Sgd {
    fn step(
        &mut self,
        network: &Network,
        grads: &candle_core::backprop::GradStore,
        recipe: &Recipe,
        lr: f64,
    ) -> Result<(), TrainError> {
        for parameter in &network.parameters {
            let Some(grad) = grads.get(parameter.var.as_tensor()) else { continue };
            let value = parameter.var.as_tensor();
            let grad = if parameter.decays && recipe.weight_decay > 0.0 {
                (grad + (value * recipe.weight_decay)?)?
            } else {
                grad.clone()
            };
            let velocity = match self.velocity.get(&parameter.name) {
                Some(v) => ((v * recipe.momentum)? + grad)?,
                None => grad,
            };
            parameter.var.set(&(value - (&velocity * lr)?)?)?;
            self.velocity.insert(parameter.name.clone(), velocity);
        }
        Ok(())
    }
}

/// Training frees and reallocates the same large activation buffers every
/// step. glibc gives blocks above its mmap threshold back to the kernel when
/// they are freed, so every step faulted them in again: perf put a third of
/// a step in the kernel, and a convolution's backward pass ran 1.6x faster
/// with freed memory kept in the heap for the next step to reuse.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Trains `network` on `examples`, resuming from `checkpoint` when it holds
/// a checkpoint of the same recipe.
pub fn fit(
    network: &mut Network,
    examples: &Examples,
    recipe: &Recipe,
    checkpoint: &Path,
    cancel: &AtomicBool,
    mut on_step: impl FnMut(Step),
) -> Result<Outcome, TrainError> {
    if examples.is_empty() {
        return Err(TrainError::Model("no training examples".into()));
    }
    keep_freed_memory();
    let mut sgd = Sgd { velocity: HashMap::new() };
    let mut epoch_losses = Vec::new();
    let resumed_epochs = restore(network, &mut sgd, recipe, checkpoint, &mut epoch_losses)?;
    let batch = recipe.batch_size.min(examples.len());
    let steps_per_epoch = examples.len() / batch;
    let total_steps = steps_per_epoch * recipe.epochs as usize;
    let started = Instant::now();
    let mut images_seen = 0usize;
    for epoch in resumed_epochs..recipe.epochs {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        // The epoch's seed, so a resumed run shuffles as the first did.
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(recipe.seed.wrapping_add(epoch as u64)));
        let mut augmenter = rand_chacha::ChaCha8Rng::seed_from_u64(recipe.seed ^ (0x5eed << 32) ^ epoch as u64);
        let mut loss_sum = 0.0f64;
        for step in 0..steps_per_epoch {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let indices = &order[step * batch..(step + 1) * batch];
            let (images, labels) = if recipe.augment {
                examples.augmented_batch(indices, &mut augmenter)?
            } else {
                examples.batch(indices)?
            };
            let logits = network.forward(&images, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let loss_value: f32 = loss.to_scalar()?;
            if !loss_value.is_finite() {
                return Err(TrainError::NotFinite {
                    epoch: epoch + 1,
                    step: step + 1,
                    checkpoint: (epoch > 0).then(|| checkpoint.to_path_buf()),
                });
            }
            let global_step = epoch as usize * steps_per_epoch + step;
            let lr = recipe.learning_rate_at(global_step, total_steps);
            sgd.step(network, &loss.backward()?, recipe, lr)?;
            loss_sum += loss_value as f64;
            images_seen += batch;
            on_step(Step {
                epoch: epoch + 1,
                step: step + 1,
                steps_per_epoch,
                loss: loss_value,
                learning_rate: lr,
                images_per_s: images_seen as f64 / started.elapsed().as_secs_f64(),
            });
        }
        epoch_losses.push((loss_sum / steps_per_epoch.max(1) as f64) as f32);
        save(network, &sgd, recipe, checkpoint, epoch + 1, &epoch_losses)?;
    }
    Ok(Outcome { epoch_losses, resumed_epochs, images_per_s: images_seen as f64 / started.elapsed().as_secs_f64() })
}

/// Top-1 accuracy, in evaluation mode (running statistics).
pub fn accuracy(network: &mut Network, examples: &Examples, batch: usize) -> Result<(f64, Vec<u32>), TrainError> {
    let mut predicted = Vec::with_capacity(examples.len());
    let indices: Vec<usize> = (0..examples.len()).collect();
    for chunk in indices.chunks(batch) {
        let (images, _) = examples.batch(chunk)?;
        predicted.extend(predictions(&network.forward(&images, false)?)?);
    }
    let correct = predicted.iter().zip(&examples.labels).filter(|(p, l)| p == l).count();
    Ok((correct as f64 / examples.len() as f64, predicted))
}

fn save(
    network: &Network,
    sgd: &Sgd,
    recipe: &Recipe,
    dir: &Path,
    epochs_done: u32,
    losses: &[f32],
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for parameter in &network.parameters {
        tensors.insert(format!("param/{}", parameter.name), parameter.var.as_tensor().clone());
    }
    for (name, velocity) in &sgd.velocity {
        tensors.insert(format!("velocity/{name}"), velocity.clone());
    }
    for (name, value) in network.running_statistics() {
        tensors.insert(format!("running/{name}"), value);
    }
    // Tensors first, then the state that vouches for them: a kill between
    // the two leaves the previous epoch's state, which then mismatches
    // nothing it names.
    let staged = dir.join(format!("{TENSORS}.partial"));
    candle_core::safetensors::save(&tensors, &staged)?;
    std::fs::rename(&staged, dir.join(TENSORS)).map_err(|e| io_error(dir, e))?;
    let state = CheckpointState { recipe: recipe.clone(), epochs_done, epoch_losses: losses.to_vec() };
    let staged = dir.join(format!("{STATE}.partial"));
    std::fs::write(&staged, serde_json::to_vec_pretty(&state).expect("state serializes"))
        .map_err(|e| io_error(dir, e))?;
    std::fs::rename(&staged, dir.join(STATE)).map_err(|e| io_error(dir, e))?;
    Ok(())
}

/// Loads a checkpoint of this recipe; returns the epochs it holds (0 if none).
fn restore(
    network: &mut Network,
    sgd: &mut Sgd,
    recipe: &Recipe,
    dir: &Path,
    losses: &mut Vec<f32>,
) -> Result<u32, TrainError> {
    let Ok(text) = std::fs::read(dir.join(STATE)) else { return Ok(0) };
    let Ok(state) = serde_json::from_slice::<CheckpointState>(&text) else { return Ok(0) };
    if state.recipe != *recipe || state.epochs_done > recipe.epochs {
        return Ok(0);
    }
    let tensors = candle_core::safetensors::load(dir.join(TENSORS), &Device::Cpu)?;
    for parameter in &network.parameters {
        let saved = tensors.get(&format!("param/{}", parameter.name)).ok_or_else(|| {
            TrainError::Model(format!("the checkpoint in {} lacks {}", dir.display(), parameter.name))
        })?;
        parameter.var.set(saved)?;
        if let Some(velocity) = tensors.get(&format!("velocity/{}", parameter.name)) {
            sgd.velocity.insert(parameter.name.clone(), velocity.clone());
        }
    }
    for (name, value) in
        tensors.iter().filter_map(|(k, v)| k.strip_prefix("running/").map(|n| (n.to_string(), v.clone())))
    {
        network.set_running_statistic(&name, value);
    }
    *losses = state.epoch_losses;
    Ok(state.epochs_done)
}

fn io_error(dir: &Path, e: std::io::Error) -> TrainError {
    TrainError::Model(format!("cannot write the checkpoint in {}: {e}", dir.display()))
}

/// The checkpoint directory of a training task inside a results directory.
pub fn checkpoint_dir(results_root: &Path, key: &str) -> PathBuf {
    results_root.join("checkpoints").join(key)
}
