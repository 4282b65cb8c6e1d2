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
use crate::spec::{Augmentation, QatSelect};

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
    /// Random transforms of each training image, in order.
    #[serde(default)]
    pub augment: Vec<Augmentation>,
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
            augment: if train.augment { Augmentation::shifts_and_flips() } else { Vec::new() },
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
    /// Which rows this set is, when it is a part of another (a range
    /// test's share of the training subset); `None`: all of them.
    picked: Option<std::sync::Arc<Vec<usize>>>,
    /// Channels, height, width of one image.
    pub image_shape: [usize; 3],
    pub labels: Vec<u32>,
}

/// Where the images are.
#[derive(Clone)]
enum Rows {
    /// Preprocessed in memory (an IDX split, for `qsweep train`).
    Memory(std::sync::Arc<Vec<f32>>),
    /// Read from prepare-data's shards as each batch is drawn, so memory
    /// holds a batch, not the training set.
    Prepared(std::sync::Arc<PreparedSet>),
}

impl From<crate::data::Tensors> for Examples {
    /// The preprocessed images and labels of a split.
    fn from(tensors: crate::data::Tensors) -> Self {
        let &[_, c, h, w] = tensors.images.shape() else { unreachable!("an Array4 has four dimensions") };
        Self {
            rows: Rows::Memory(std::sync::Arc::new(tensors.images.iter().copied().collect())),
            picked: None,
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
            picked: None,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// A seeded draw of `count` examples (all, if there are fewer), in
    /// their order here. A draw, not the first `count`: sources list their
    /// images class by class (an image folder does), so a prefix would be
    /// a few classes only.
    pub fn sample(&self, count: usize, seed: u64) -> Examples {
        let drawn = crate::data::calibration_indices(self.len(), count, seed);
        Examples {
            rows: self.rows.clone(),
            image_shape: self.image_shape,
            labels: drawn.iter().map(|&i| self.labels[i]).collect(),
            picked: Some(std::sync::Arc::new(drawn.iter().map(|&i| self.row(i)).collect())),
        }
    }

    /// The row of `rows` that example `index` is.
    fn row(&self, index: usize) -> usize {
        self.picked.as_ref().map_or(index, |picked| picked[index])
    }

    /// The images and labels at `indices`, as a batch.
    pub fn batch(&self, examples: &[usize]) -> Result<(Tensor, Tensor), TrainError> {
        let rows: Vec<usize> = examples.iter().map(|&i| self.row(i)).collect();
        let indices = rows.as_slice();
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
        let labels: Vec<u32> = examples.iter().map(|&i| self.labels[i]).collect();
        Ok((images, Tensor::new(labels, &Device::Cpu)?))
    }
}

impl Examples {
    /// A batch with `pipeline`'s random transforms applied to each image.
    pub fn augmented_batch(
        &self,
        indices: &[usize],
        pipeline: &[Augmentation],
        rng: &mut impl rand::Rng,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let (images, labels) = self.batch(indices)?;
        let mut values: Vec<f32> = images.flatten_all()?.to_vec1()?;
        for image in values.chunks_mut(self.image_shape.iter().product()) {
            super::augment::apply(pipeline, image, self.image_shape, rng);
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
    /// With validation: the score before training (epoch 0) and after
    /// each epoch.
    pub curve: Vec<EpochScore>,
    /// With validation: the epoch whose weights the network holds now.
    pub kept_epoch: Option<u32>,
    /// Seconds spent scoring the validation subset (in this attempt).
    pub validation_s: f64,
    /// Where the loss stopped being finite, when the kept epoch's model
    /// was returned instead of failing (`select: best` only).
    #[serde(default)]
    pub diverged: Option<Divergence>,
}

/// The step at which a training's loss stopped being finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    pub epoch: u32,
    pub step: usize,
}

/// How a training is scored after every epoch, and which epoch it keeps:
/// the last, or the best, where a later epoch displaces an earlier one
/// only when it is [`significantly_better`].
pub struct Validation<'a> {
    pub examples: &'a Examples,
    pub select: QatSelect,
}

/// One point of a validation curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochScore {
    /// 0 before training.
    pub epoch: u32,
    /// Validation top-1, in percent.
    pub top1: f64,
    /// Validation images classified right (what ties are judged on).
    pub correct: usize,
    /// Mean validation cross-entropy.
    pub loss: f64,
    /// The learning rate the schedule had reached at the end of the epoch.
    pub learning_rate: f64,
    /// Mean training loss over the epoch; none at epoch 0.
    pub train_loss: Option<f32>,
}

/// Whether `candidate` beats `kept` by more than validation noise, judged
/// on the same images by McNemar's exact test: of the images the two
/// disagree on, it must fix significantly more than it breaks (one-sided,
/// 5%). A few images either way out of thousands is what reshuffling a
/// fine-tuning run moves anyway, and choosing on it chose epochs that
/// were worse on the test split; so the earlier epoch keeps such ties.
/// Exact, not the normal approximation: that one passes 3 fixed and none
/// broken, which is 1 chance in 8.
pub fn significantly_better(candidate: &[bool], kept: &[bool]) -> bool {
    let fixed = candidate.iter().zip(kept).filter(|(c, k)| **c && !**k).count();
    let broken = candidate.iter().zip(kept).filter(|(c, k)| !**c && **k).count();
    fixed > broken && sign_test_p(fixed, fixed + broken) <= 0.05
}

/// P(X >= `successes`) for X ~ Binomial(`trials`, 1/2): the one-sided
/// p-value of the sign test, computed in logs so thousands of trials
/// neither overflow nor underflow.
fn sign_test_p(successes: usize, trials: usize) -> f64 {
    let (k, n) = (successes as f64, trials as f64);
    // ln C(n, k), then the tail's terms relative to C(n, k).
    let ln_choose: f64 = (1..=successes).map(|i| ((n - k + i as f64) / i as f64).ln()).sum();
    let mut term = 1.0;
    let mut relative_sum = 0.0;
    for j in successes..=trials {
        relative_sum += term;
        term *= (trials - j) as f64 / (j + 1) as f64;
    }
    (ln_choose - n * std::f64::consts::LN_2 + relative_sum.ln()).exp().min(1.0)
}

/// Where the checkpoint of one training lives, and what it says.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    recipe: Recipe,
    epochs_done: u32,
    epoch_losses: Vec<f32>,
    #[serde(default)]
    curve: Vec<EpochScore>,
    /// Which validation images the kept epoch classifies right.
    #[serde(default)]
    kept_right: Vec<bool>,
}

/// A copy of the weights (and BatchNorm statistics) at one epoch.
struct Snapshot {
    epoch: u32,
    tensors: HashMap<String, Tensor>,
}

impl Snapshot {
    fn take(network: &Network, epoch: u32) -> Result<Self, TrainError> {
        let mut tensors = HashMap::new();
        for parameter in &network.parameters {
            // A copy: a Var's tensor is updated in place.
            tensors.insert(format!("param/{}", parameter.name), parameter.var.as_tensor().copy()?);
        }
        for (name, value) in network.running_statistics() {
            tensors.insert(format!("running/{name}"), value.copy()?);
        }
        Ok(Snapshot { epoch, tensors })
    }

    /// Puts the snapshot's values back into `network`.
    fn restore_into(&self, network: &mut Network, origin: &Path) -> Result<(), TrainError> {
        load_tensors(network, &self.tensors, origin)
    }
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
/// a checkpoint of the same recipe. With `validation`, the network is
/// scored before training and after every epoch, and ends holding the
/// epoch its `select` keeps.
pub fn fit(
    network: &mut Network,
    examples: &Examples,
    recipe: &Recipe,
    checkpoint: &Path,
    validation: Option<&Validation<'_>>,
    cancel: &AtomicBool,
    mut on_step: impl FnMut(Step),
) -> Result<Outcome, TrainError> {
    if examples.is_empty() {
        return Err(TrainError::Model("no training examples".into()));
    }
    keep_freed_memory();
    let mut sgd = Sgd { velocity: HashMap::new() };
    let restored = restore(network, &mut sgd, recipe, checkpoint)?;
    let resumed_epochs = restored.epochs_done;
    let (mut epoch_losses, mut curve, mut best) = (restored.epoch_losses, restored.curve, restored.best);
    let mut kept_right = restored.kept_right;
    let batch = recipe.batch_size.min(examples.len());
    let steps_per_epoch = examples.len() / batch;
    let total_steps = steps_per_epoch * recipe.epochs as usize;
    let mut validation_s = 0.0;
    let mut timed_score = |network: &mut Network, examples: &Examples, epoch, lr, train_loss| {
        let started = Instant::now();
        let scored = score(network, examples, epoch, lr, train_loss);
        validation_s += started.elapsed().as_secs_f64();
        scored
    };
    if let Some(validation) = validation.filter(|_| curve.is_empty()) {
        let (start, right) = timed_score(network, validation.examples, 0, recipe.learning_rate, None)?;
        curve.push(start);
        kept_right = right;
        if validation.select == QatSelect::Best {
            best = Some(Snapshot::take(network, 0)?);
        }
    }
    let started = Instant::now();
    let mut images_seen = 0usize;
    let mut diverged = None;
    'epochs: for epoch in resumed_epochs..recipe.epochs {
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
            let (images, labels) = if recipe.augment.is_empty() {
                examples.batch(indices)?
            } else {
                examples.augmented_batch(indices, &recipe.augment, &mut augmenter)?
            };
            let logits = network.forward(&images, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let loss_value: f32 = loss.to_scalar()?;
            if !loss_value.is_finite() {
                // With a best epoch kept, a diverged training still has a
                // model at least as good as its start: return that one.
                if best.is_some() {
                    diverged = Some(Divergence { epoch: epoch + 1, step: step + 1 });
                    break 'epochs;
                }
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
        let train_loss = (loss_sum / steps_per_epoch.max(1) as f64) as f32;
        epoch_losses.push(train_loss);
        if let Some(validation) = validation {
            let lr = recipe.learning_rate_at((epoch as usize + 1) * steps_per_epoch, total_steps);
            let (scored, right) = timed_score(network, validation.examples, epoch + 1, lr, Some(train_loss))?;
            curve.push(scored);
            if validation.select == QatSelect::Best && significantly_better(&right, &kept_right) {
                best = Some(Snapshot::take(network, epoch + 1)?);
                kept_right = right;
            }
        }
        let state = CheckpointState {
            recipe: recipe.clone(),
            epochs_done: epoch + 1,
            epoch_losses: epoch_losses.clone(),
            curve: curve.clone(),
            kept_right: kept_right.clone(),
        };
        save(network, &sgd, &state, best.as_ref(), checkpoint)?;
    }
    let kept_epoch = match (validation, best) {
        (Some(Validation { select: QatSelect::Best, .. }), Some(best)) => {
            best.restore_into(network, checkpoint)?;
            Some(best.epoch)
        }
        (Some(_), _) => Some(recipe.epochs),
        (None, _) => None,
    };
    Ok(Outcome {
        epoch_losses,
        resumed_epochs,
        images_per_s: images_seen as f64 / started.elapsed().as_secs_f64(),
        curve,
        kept_epoch,
        validation_s,
        diverged,
    })
}

/// Images scored per forward pass.
const SCORE_BATCH: usize = 256;

/// The network's validation top-1 and mean loss, in evaluation mode, and
/// which images it classifies right.
fn score(
    network: &mut Network,
    examples: &Examples,
    epoch: u32,
    learning_rate: f64,
    train_loss: Option<f32>,
) -> Result<(EpochScore, Vec<bool>), TrainError> {
    let (mut right, mut loss_sum) = (Vec::with_capacity(examples.len()), 0f64);
    let indices: Vec<usize> = (0..examples.len()).collect();
    for chunk in indices.chunks(SCORE_BATCH) {
        let (images, labels) = examples.batch(chunk)?;
        let logits = network.forward(&images, false)?;
        let loss: f32 = candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar()?;
        loss_sum += loss as f64 * chunk.len() as f64;
        let truth: Vec<u32> = labels.to_vec1()?;
        right.extend(predictions(&logits)?.iter().zip(&truth).map(|(p, l)| p == l));
    }
    let count = examples.len().max(1);
    let correct = right.iter().filter(|r| **r).count();
    let scored = EpochScore {
        epoch,
        top1: correct as f64 * 100.0 / count as f64,
        correct,
        loss: loss_sum / count as f64,
        learning_rate,
        train_loss,
    };
    Ok((scored, right))
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

/// The prefix of the best epoch's tensors in a checkpoint.
const BEST: &str = "best/";

/// The checkpoint tensor naming the epochs its weights have had.
const EPOCHS_DONE: &str = "epochs_done";

fn save(
    network: &Network,
    sgd: &Sgd,
    state: &CheckpointState,
    best: Option<&Snapshot>,
    dir: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = Snapshot::take(network, state.epochs_done)?.tensors;
    tensors.insert(EPOCHS_DONE.to_string(), Tensor::new(state.epochs_done, &Device::Cpu)?);
    for (name, velocity) in &sgd.velocity {
        tensors.insert(format!("velocity/{name}"), velocity.clone());
    }
    if let Some(best) = best {
        tensors.insert(format!("{BEST}epoch"), Tensor::new(best.epoch, &Device::Cpu)?);
        for (name, value) in &best.tensors {
            tensors.insert(format!("{BEST}{name}"), value.clone());
        }
    }
    // Tensors first, then the state that vouches for them. A kill between
    // the two leaves the previous epoch's state beside this epoch's
    // tensors; both name their epoch, and `restore` refuses the pair.
    let staged = dir.join(format!("{TENSORS}.partial"));
    candle_core::safetensors::save(&tensors, &staged)?;
    std::fs::rename(&staged, dir.join(TENSORS)).map_err(|e| io_error(dir, e))?;
    let staged = dir.join(format!("{STATE}.partial"));
    std::fs::write(&staged, serde_json::to_vec_pretty(state).expect("state serializes"))
        .map_err(|e| io_error(dir, e))?;
    std::fs::rename(&staged, dir.join(STATE)).map_err(|e| io_error(dir, e))?;
    Ok(())
}

/// What a checkpoint gave back.
#[derive(Default)]
struct Restored {
    epochs_done: u32,
    epoch_losses: Vec<f32>,
    curve: Vec<EpochScore>,
    kept_right: Vec<bool>,
    best: Option<Snapshot>,
}

/// Loads a checkpoint of this recipe (nothing, if there is none).
fn restore(network: &mut Network, sgd: &mut Sgd, recipe: &Recipe, dir: &Path) -> Result<Restored, TrainError> {
    let Ok(text) = std::fs::read(dir.join(STATE)) else { return Ok(Restored::default()) };
    let Ok(state) = serde_json::from_slice::<CheckpointState>(&text) else { return Ok(Restored::default()) };
    if state.recipe != *recipe || state.epochs_done > recipe.epochs {
        return Ok(Restored::default());
    }
    // A tensors file that does not load is a checkpoint to start over from.
    let Ok(tensors) = candle_core::safetensors::load(dir.join(TENSORS), &Device::Cpu) else {
        return Ok(Restored::default());
    };
    let tensors_epoch: Option<u32> = tensors.get(EPOCHS_DONE).and_then(|t| t.to_scalar().ok());
    if tensors_epoch != Some(state.epochs_done) {
        // Killed between writing the tensors and the state: start over
        // rather than resume one epoch's weights as another's.
        return Ok(Restored::default());
    }
    load_tensors(network, &tensors, dir)?;
    for parameter in &network.parameters {
        if let Some(velocity) = tensors.get(&format!("velocity/{}", parameter.name)) {
            sgd.velocity.insert(parameter.name.clone(), velocity.clone());
        }
    }
    let best = match tensors.get(&format!("{BEST}epoch")) {
        Some(epoch) => Some(Snapshot {
            epoch: epoch.to_scalar()?,
            tensors: tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(BEST).filter(|n| *n != "epoch").map(|n| (n.to_string(), v.clone())))
                .collect(),
        }),
        None => None,
    };
    Ok(Restored {
        epochs_done: state.epochs_done,
        epoch_losses: state.epoch_losses,
        curve: state.curve,
        kept_right: state.kept_right,
        best,
    })
}

/// Sets the network's parameters and running statistics from `tensors`
/// (`param/NAME`, `running/NAME`); `origin` names where they came from
/// when one is missing.
fn load_tensors(network: &mut Network, tensors: &HashMap<String, Tensor>, origin: &Path) -> Result<(), TrainError> {
    for parameter in &network.parameters {
        let saved = tensors.get(&format!("param/{}", parameter.name)).ok_or_else(|| {
            TrainError::Model(format!("the checkpoint in {} lacks {}", origin.display(), parameter.name))
        })?;
        parameter.var.set(saved)?;
    }
    for (name, value) in
        tensors.iter().filter_map(|(k, v)| k.strip_prefix("running/").map(|n| (n.to_string(), v.clone())))
    {
        network.set_running_statistic(&name, value);
    }
    Ok(())
}

fn io_error(dir: &Path, e: std::io::Error) -> TrainError {
    TrainError::Model(format!("cannot write the checkpoint in {}: {e}", dir.display()))
}

/// The checkpoint directory of a training task inside a results directory.
pub fn checkpoint_dir(results_root: &Path, key: &str) -> PathBuf {
    results_root.join("checkpoints").join(key)
}

#[cfg(test)]
mod tests {
    use super::sign_test_p;

    #[test]
    fn sign_test_tails_match_the_binomial_sums() {
        // Exact sums of C(n, j) / 2^n for j >= k.
        for (k, n, p) in [(20, 28, 0.017849069), (3, 3, 0.125), (1050, 2000, 0.013412073), (1000, 2000, 0.508919506)] {
            assert!((sign_test_p(k, n) - p).abs() < 1e-8, "P(X >= {k} | {n}) = {}, not {p}", sign_test_p(k, n));
        }
        assert!(sign_test_p(270, 300) < 1e-40, "far tails do not underflow to garbage");
        assert_eq!(sign_test_p(0, 10), 1.0);
    }
}
