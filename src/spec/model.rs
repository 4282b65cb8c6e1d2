//! The typed shape of a sweep spec file, exactly as a user writes it.
//!
//! These types are the single source of truth for the JSON Schema
//! (`qsweep schema`, experiments/schema.json): every field's doc comment
//! becomes its schema description, which editors show as a hover hint.
//! Defaults live here too, so a spec only says what differs.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One sweep: a model, its data, and the quantization recipes to compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// Optional link to this schema, for editors.
    #[serde(rename = "$schema", default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Names the sweep; results go to `results/<name>` unless `qsweep run --results` says otherwise.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"), length(max = 100))]
    pub name: String,
    /// The fp32 model: a path to an ONNX file (relative to this spec
    /// file), or `{"train": {...}}` for a ResNet qsweep trains first, as a
    /// cached stage of the sweep.
    pub model: ModelSource,
    /// The dataset and how to preprocess it for the model.
    #[serde(default)]
    pub data: DataSpec,
    /// The calibration set drawn from the training split.
    #[serde(default)]
    pub calibration: CalibrationSpec,
    /// The axes whose cartesian product gives the quantized runs.
    #[serde(default)]
    pub matrix: MatrixSpec,
    /// Extra combinations, with the semantics of GitHub Actions' `matrix.include`.
    #[serde(default)]
    pub include: Vec<MatrixEntry>,
    /// Combinations to drop from the product (partial matches drop every matching run).
    #[serde(default)]
    pub exclude: Vec<MatrixEntry>,
    /// Unquantized reference runs; every delta in the reports is against fp32.
    #[serde(default = "default_baselines")]
    pub baselines: Vec<Baseline>,
    /// How QAT fine-tunes runs whose `qat_epochs` is above 0.
    #[serde(default)]
    pub qat: QatSpec,
    /// How each built model is measured.
    #[serde(default)]
    pub evaluate: EvaluateSpec,
    /// Per-layer sensitivity, and how `float_layers` picks the ops it
    /// leaves in float. Given, every PTQ recipe gets a sensitivity ranking
    /// in the reports; left out, only runs with `float_layers` compute one
    /// (with these defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // An object in the schema, not "object or null", so that a bad value
    // inside it is reported at its own field.
    #[schemars(with = "SensitivitySpec")]
    pub sensitivity: Option<SensitivitySpec>,
    /// How int8 models are written: `tensorrt` (TensorRT's explicit
    /// quantization: symmetric int8 activations, full-range per-channel
    /// weights, Q/DQ on the inputs of weighted ops only, BatchNorm left to
    /// the engine) or `onnxruntime-cpu` (what ONNX Runtime's CPU int8
    /// kernels need: BatchNorm folded, uint8 activations with Q/DQ on the
    /// outputs of weighted ops too, 7-bit weights against AVX2 int16
    /// saturation, int32 biases). Defaults to the engine's own format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8_format: Option<Int8Format>,
    /// What each Kubernetes worker pod gets (the k8s backend only; local
    /// and Redis runs ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// How many times a failing stage is retried before its run is marked failed.
    #[serde(default = "default_retries")]
    #[schemars(range(max = 10))]
    pub retries: u32,
    /// Wall-clock limit in seconds for one attempt of one stage.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1))]
    pub timeout: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ModelSource {
    /// Path to an fp32 ONNX model, relative to this spec file.
    File(String),
    Trained(TrainedModel),
}

/// A model qsweep trains before the sweep's other stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainedModel {
    pub train: TrainSpec,
}

/// The ResNet to train (the CIFAR-style family: resnet-8/20/32 for 28x28
/// and 32x32 images) and how. SGD with momentum 0.9 and a half-cosine
/// learning-rate decay.
///
/// `qsweep train` takes the same fields as flags, so each default and
/// range lives here once, for the schema and the command line alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// 6n + 2: 8, 14, 20, 32, ...
    #[serde(default = "default_depth")]
    #[schemars(range(min = TRAIN_DEPTH.0, max = TRAIN_DEPTH.1))]
    #[arg(long, default_value_t = default_depth(), value_parser = clap::value_parser!(u32).range(TRAIN_DEPTH.0 as i64..=TRAIN_DEPTH.1 as i64))]
    pub depth: u32,
    /// Channels of the first stage (doubled at each later stage).
    #[serde(default = "default_width")]
    #[schemars(range(min = TRAIN_WIDTH.0, max = TRAIN_WIDTH.1))]
    #[arg(long, default_value_t = default_width(), value_parser = clap::value_parser!(u32).range(TRAIN_WIDTH.0 as i64..=TRAIN_WIDTH.1 as i64))]
    pub width: u32,
    #[serde(default = "default_train_epochs")]
    #[schemars(range(min = TRAIN_EPOCHS.0, max = TRAIN_EPOCHS.1))]
    #[arg(long, default_value_t = default_train_epochs(), value_parser = clap::value_parser!(u32).range(TRAIN_EPOCHS.0 as i64..=TRAIN_EPOCHS.1 as i64))]
    pub epochs: u32,
    /// Starting learning rate: above 0, at most 10 (0.1 is usual from scratch).
    #[serde(default = "default_train_learning_rate")]
    #[schemars(range(max = TRAIN_LEARNING_RATE_MAX), extend("exclusiveMinimum" = 0.0))]
    #[arg(long, default_value_t = default_train_learning_rate(), value_parser = learning_rate)]
    pub learning_rate: f64,
    #[serde(default = "default_train_weight_decay")]
    #[schemars(range(min = TRAIN_WEIGHT_DECAY.0, max = TRAIN_WEIGHT_DECAY.1))]
    #[arg(long, default_value_t = default_train_weight_decay(), value_parser = weight_decay)]
    pub weight_decay: f64,
    #[serde(default = "default_train_batch")]
    #[schemars(range(min = TRAIN_BATCH.0, max = TRAIN_BATCH.1))]
    #[arg(long, default_value_t = default_train_batch(), value_parser = clap::value_parser!(u32).range(TRAIN_BATCH.0 as i64..=TRAIN_BATCH.1 as i64))]
    pub batch_size: u32,
    /// Training images used: a seeded subset of the training split.
    #[serde(default = "default_train_samples")]
    #[schemars(range(min = TRAIN_SAMPLES.0, max = TRAIN_SAMPLES.1))]
    #[arg(long, default_value_t = default_train_samples(), value_parser = clap::value_parser!(u32).range(TRAIN_SAMPLES.0 as i64..=TRAIN_SAMPLES.1 as i64))]
    pub samples: u32,
    /// Seed of the initialization, the subset, the shuffles and the augmentation.
    #[serde(default)]
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random 2-pixel shifts and horizontal flips of training images
    /// (`--no-augment` turns them off).
    #[serde(default = "default_true")]
    #[arg(long = "no-augment", action = clap::ArgAction::SetFalse)]
    pub augment: bool,
}

/// `TrainSpec`'s bounds, inclusive.
const TRAIN_DEPTH: (u32, u32) = (8, 110);
const TRAIN_WIDTH: (u32, u32) = (1, 512);
const TRAIN_EPOCHS: (u32, u32) = (1, 1000);
const TRAIN_LEARNING_RATE_MAX: f64 = 10.0;
const TRAIN_WEIGHT_DECAY: (f64, f64) = (0.0, 0.1);
const TRAIN_BATCH: (u32, u32) = (1, 4096);
/// Ten times ImageNet's training split: more is a typo, and each sample's
/// index is held in memory.
const TRAIN_SAMPLES: (u32, u32) = (1, 12_811_670);

fn learning_rate(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    (value > 0.0 && value <= TRAIN_LEARNING_RATE_MAX)
        .then_some(value)
        .ok_or_else(|| format!("{value} is not above 0 and at most {TRAIN_LEARNING_RATE_MAX}"))
}

fn weight_decay(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    (TRAIN_WEIGHT_DECAY.0..=TRAIN_WEIGHT_DECAY.1)
        .contains(&value)
        .then_some(value)
        .ok_or_else(|| format!("{value} is outside {} to {}", TRAIN_WEIGHT_DECAY.0, TRAIN_WEIGHT_DECAY.1))
}

/// Kubernetes settings of the worker pods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// NVIDIA GPUs per pod (`nvidia.com/gpu` in limits).
    #[serde(default)]
    pub gpu: u32,
    /// CPU request and limit, as a Kubernetes quantity (e.g. "4" or "3500m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory request and limit, as a Kubernetes quantity (e.g. "16Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Worker pods run at once, at most.
    #[serde(default = "default_max_parallel")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_parallel: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class: Option<String>,
    /// Names of Secrets for pulling the worker image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Kueue LocalQueue to submit the Job to (`kueue.x-k8s.io/queue-name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kueue_queue: Option<String>,
    /// PersistentVolumeClaim mounted at /data in every pod, for datasets
    /// and artifacts (not needed with an s3:// artifact store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_claim: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Exists or Equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// NoSchedule, PreferNoSchedule or NoExecute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
}

/// Which dataset feeds calibration and evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The dataset's layout; both are 28x28 grey images with 10 classes in IDX files.
    #[serde(default)]
    pub dataset: Dataset,
    /// Directory holding the four IDX files (gzipped or not). Defaults to where
    /// Debian's dataset package installs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Pixel preprocessing, which must match what the model was trained with.
    #[serde(default)]
    pub preprocess: Preprocess,
    /// Where the evaluation images come from [default: the IDX dataset's test split].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<SourceSpec>,
    /// Where the calibration images come from (labels not needed); the
    /// subset is `calibration.samples` and `calibration.seed` unless the
    /// source says [default: the IDX dataset's training split].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<SourceSpec>,
    /// Where QAT's and `train`'s images come from; the subset is
    /// `qat.samples` and `qat.seed` unless the source says [default: the
    /// IDX dataset's training split].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<SourceSpec>,
}

/// Where one role's samples come from: a folder of images (`images`), or
/// a tensor file of already preprocessed inputs (`tensors`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A folder of images, relative to the spec file: one subfolder per
    /// class (torchvision's ImageFolder layout), or any layout with a
    /// `labels_file`. JPEG, PNG, BMP and WebP files are read; hidden files
    /// and folders are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// With `images`: a text file of `relative/path label` lines, one per
    /// image, as ImageNet's val.txt; labels are class indices, or names
    /// from `classes`. Relative to the spec file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_file: Option<String>,
    /// A tensor file of preprocessed inputs, relative to the spec file:
    /// `.npy`; `.npz`; `.pt` from torch.save holding a tensor, a dict, a
    /// list or tuple of tensors, an (inputs, labels) pair or a list of
    /// (input, label) pairs; or a folder of such `.pt` files. Float inputs
    /// are used as they are; uint8 inputs get `data.preprocess`'s scale,
    /// mean and std.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors: Option<String>,
    /// The dict or `.npz` entry that holds the inputs [default: the
    /// model's input name, else `images`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_key: Option<String>,
    /// The dict or `.npz` entry that holds the labels [default: `labels`,
    /// if there is one].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_key: Option<String>,
    /// With `images`: every class name in index order, for a folder that
    /// holds only some of the classes the model scores [default: the
    /// subfolders, sorted].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// Use a seeded subset of this many samples [default: all, or the
    /// section's `samples` for calibration and training].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub samples: Option<u32>,
    /// Seed of that subset [default: the section's `seed`, or 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    #[default]
    FashionMnist,
    Mnist,
}

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::FashionMnist => "fashion-mnist",
            Dataset::Mnist => "mnist",
        }
    }

    /// Where Debian's `dataset-*` packages put the files.
    pub fn default_dir(self) -> &'static str {
        match self {
            Dataset::FashionMnist => "/usr/share/datasets/fashion-mnist",
            Dataset::Mnist => "/usr/share/datasets/mnist",
        }
    }
}

/// `x = (pixel / scale - mean[c]) / std[c]`, the usual torchvision
/// ToTensor + Normalize pipeline when `scale` is 255.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Divides raw 0-255 pixels; 255 maps them to [0, 1].
    #[serde(default = "default_scale")]
    #[schemars(range(min = 1))]
    pub scale: f32,
    /// Per-channel mean subtracted after scaling (one value per model input channel).
    #[serde(default = "default_mean")]
    #[schemars(length(min = 1))]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided after the mean (all positive).
    #[serde(default = "default_std")]
    #[schemars(length(min = 1))]
    pub std: Vec<f32>,
    /// Image sources only: `T.Resize`: an int resizes the shorter side to
    /// it (the longer in proportion), `[h, w]` resizes to exactly that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<Size>,
    /// Image sources only: the resize filter, as PIL applies it.
    #[serde(default, skip_serializing_if = "is_default")]
    pub interpolation: Interpolation,
    /// Image sources only: widen the filter when shrinking, as PIL always
    /// does; false follows torchvision's tensor path instead.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub antialias: bool,
    /// Image sources only: `T.CenterCrop`: an int or `[h, w]`; a smaller
    /// image is padded with zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub center_crop: Option<Size>,
    /// Image sources only: the colour mode images are converted to, as
    /// PIL's `convert` does [default: rgb for a 3-channel model, grey for 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<Color>,
    /// Where the channel axis of the model's input is [default: nchw].
    #[serde(default, skip_serializing_if = "is_default")]
    pub layout: Layout,
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            scale: default_scale(),
            mean: default_mean(),
            std: default_std(),
            resize: None,
            interpolation: Interpolation::default(),
            antialias: true,
            center_crop: None,
            color: None,
            layout: Layout::default(),
        }
    }
}

/// A size in torchvision's terms: one number, or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Size {
    /// Sides above 16384 pixels are refused: a decoded image of that size
    /// already takes 768 MiB.
    Single(#[schemars(range(min = 1, max = 16384))] u32),
    Pair(#[schemars(length(min = 2, max = 2), inner(range(min = 1, max = 16384)))] [u32; 2]),
}

impl Size {
    /// `[height, width]`, a single number standing for a square.
    pub fn square_or_pair(self) -> [u32; 2] {
        match self {
            Size::Single(side) => [side, side],
            Size::Pair(pair) => pair,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    #[default]
    Bilinear,
    Bicubic,
    Nearest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Rgb,
    Bgr,
    Grey,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

impl Layout {
    /// The channel axis of one sample (no batch axis) of `rank` axes.
    pub fn channel_axis(self, rank: usize) -> usize {
        match self {
            Layout::Nchw => 0,
            Layout::Nhwc => rank.saturating_sub(1),
        }
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn is_true(value: &bool) -> bool {
    *value
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    /// Number of training images in the calibration set (NVIDIA's PTQ flow uses about 500).
    #[serde(default = "default_samples")]
    #[schemars(range(min = 1))]
    pub samples: u32,
    /// Seed of the draw, so the same spec always calibrates on the same images.
    #[serde(default)]
    pub seed: u64,
    /// The percentile of |x| the `percentile` method clips at.
    #[serde(default = "default_percentile")]
    #[schemars(range(max = 100.0), extend("exclusiveMinimum" = 0.0))]
    pub percentile: f64,
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        Self { samples: default_samples(), seed: 0, percentile: default_percentile() }
    }
}

/// The quantization axes. Leave them all out for a baseline-only sweep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatrixSpec {
    /// Calibration methods that derive each activation's amax.
    #[serde(default)]
    #[schemars(extend("uniqueItems" = true))]
    pub calibration: Vec<CalibrationMethod>,
    /// Whether the skip input of each residual Add is quantized too (default: just false).
    #[serde(default)]
    #[schemars(extend("uniqueItems" = true))]
    pub residual_fusion: Vec<bool>,
    /// QAT fine-tune epochs; 0 means PTQ only (default: just 0). NVIDIA's
    /// recipe fine-tunes for about 10% of the original training epochs.
    #[serde(default)]
    #[schemars(extend("uniqueItems" = true), inner(range(max = 1000)))]
    pub qat_epochs: Vec<u32>,
    /// Ops left in float, most sensitive first (default: just 0): a count
    /// k, or "auto" to revert ops one at a time until validation top-1 is
    /// within `sensitivity.accuracy_budget` of fp32's.
    #[serde(default)]
    #[schemars(extend("uniqueItems" = true))]
    pub float_layers: Vec<FloatLayers>,
}

/// How many of a run's quantized ops (weighted ops, and residual
/// quantizers with fusion) stay in float, chosen by the sensitivity ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum FloatLayers {
    /// The k most sensitive ops (0: every op quantized).
    Count(#[schemars(range(max = 10000))] u32),
    /// "auto": as few as meet `sensitivity.accuracy_budget` on the validation subset.
    Auto(AutoFloatLayers),
}

/// The one word `float_layers` takes besides a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoFloatLayers {
    Auto,
}

impl Default for FloatLayers {
    fn default() -> Self {
        FloatLayers::Count(0)
    }
}

impl FloatLayers {
    pub const AUTO: FloatLayers = FloatLayers::Auto(AutoFloatLayers::Auto);

    /// Whether every quantizable op is quantized.
    pub fn is_none(self) -> bool {
        self == FloatLayers::Count(0)
    }

    /// Its run id part: empty, `float2`, or `auto`.
    pub fn name(self) -> String {
        match self {
            FloatLayers::Count(0) => String::new(),
            FloatLayers::Count(k) => format!("float{k}"),
            FloatLayers::Auto(_) => "auto".to_string(),
        }
    }
}

/// Sensitivity analysis and accuracy-budgeted fallback.
///
/// Both are measured on a validation subset: a seeded draw from the
/// calibration source that holds none of the calibration images and never
/// comes from the evaluation (test) split, so the figure a budget is met on
/// is not the figure reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SensitivitySpec {
    /// Images each sensitivity pass scores: the first of the validation subset.
    #[serde(default = "default_sensitivity_samples")]
    #[schemars(range(min = 1))]
    pub samples: u32,
    /// Size of the validation subset `"auto"` measures the budget on (labels needed).
    #[serde(default = "default_validation_samples")]
    #[schemars(range(min = 1))]
    pub validation_samples: u32,
    /// Seed of the validation draw.
    #[serde(default)]
    pub seed: u64,
    /// Points of validation top-1 below fp32's that `float_layers: "auto"`
    /// accepts (0.3: within 0.3 points). Required by "auto".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub accuracy_budget: Option<f64>,
    /// The most ops "auto" leaves in float before it gives up and returns
    /// its best model [default: a quarter of the quantized ops, at least 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_float_layers: Option<u32>,
    /// What a float op runs in, in the `tensorrt` format: fp32, or fp16
    /// with Casts around it (what TensorRT's strongly typed networks need,
    /// since precision flags are gone). The `onnxruntime-cpu` format takes fp32 only.
    #[serde(default, skip_serializing_if = "is_default")]
    pub fallback_precision: FallbackPrecision,
}

impl Default for SensitivitySpec {
    fn default() -> Self {
        Self {
            samples: default_sensitivity_samples(),
            validation_samples: default_validation_samples(),
            seed: 0,
            accuracy_budget: None,
            max_float_layers: None,
            fallback_precision: FallbackPrecision::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FallbackPrecision {
    #[default]
    Fp32,
    Fp16,
}

/// The QAT recipe. NVIDIA's: about 10% of the original epochs (the
/// matrix's `qat_epochs`), at about 1% of the original learning rate,
/// decayed by a half cosine; SGD with momentum. BatchNorm statistics are
/// frozen (folded into the convs in the `onnxruntime-cpu` format).
///
/// Every epoch is scored on a validation subset, and the stage keeps the
/// best one (epoch 0 is the PTQ model it starts from), so a recipe that
/// does not suit the model returns its PTQ start instead of a worse model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QatSpec {
    /// Starting learning rate: about 1% of the one the model was trained
    /// with, or "auto" (the default) for a short range test of a few rates
    /// around 1% of a typical 0.1, scored on the validation subset and
    /// cached for every run with the same model, data and format.
    #[serde(default)]
    pub learning_rate: QatLearningRate,
    /// SGD momentum.
    #[serde(default = "default_momentum")]
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1.0))]
    pub momentum: f64,
    /// L2 weight decay on weights (not biases or BatchNorm).
    #[serde(default = "default_weight_decay")]
    #[schemars(range(min = 0.0, max = 0.1))]
    pub weight_decay: f64,
    /// Images per training step.
    #[serde(default = "default_train_batch")]
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: u32,
    /// Training images fine-tuned on: a seeded subset of the training
    /// split (60000 is all of Fashion-MNIST's, 1,281,167 all of ImageNet's), drawn once per sweep.
    #[serde(default = "default_qat_samples")]
    #[schemars(range(min = 1))]
    pub samples: u32,
    /// Size of the validation subset each epoch is scored on: a seeded
    /// draw from the training source holding none of the calibration
    /// images, none of the fine-tuning subset and none of the test split.
    #[serde(default = "default_qat_validation_samples")]
    #[schemars(range(min = 1))]
    pub validation_samples: u32,
    /// Which epoch's model the stage returns: "best" (a later epoch
    /// displaces an earlier one only when it is right on significantly
    /// more validation images, by McNemar's test, so epoch 0, the PTQ
    /// start, wins unless an epoch clearly beats it) or "last".
    #[serde(default)]
    pub select: QatSelect,
    /// Seed of the subsets, each epoch's shuffle and the augmentation.
    #[serde(default)]
    pub seed: u64,
    /// Random transforms of the fine-tuning images, in torchvision's
    /// terms, applied in order. None by default: fine-tuning should see
    /// the model's own training pipeline, which qsweep cannot know. (The
    /// old `true`, 2-pixel shifts and flips, is the example; `false` is `[]`.)
    #[serde(default)]
    #[schemars(example = serde_json::json!([{"pad": 2}, "random_crop", "horizontal_flip"]))]
    pub augment: Vec<Augmentation>,
}

impl Default for QatSpec {
    fn default() -> Self {
        Self {
            learning_rate: QatLearningRate::default(),
            momentum: default_momentum(),
            weight_decay: default_weight_decay(),
            batch_size: default_train_batch(),
            samples: default_qat_samples(),
            validation_samples: default_qat_validation_samples(),
            select: QatSelect::default(),
            seed: 0,
            augment: Vec::new(),
        }
    }
}

/// QAT's starting learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum QatLearningRate {
    /// A rate above 0, at most 1.
    Fixed(#[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0.0))] f64),
    /// "auto": the best of a short, cached range test.
    Auto(AutoLearningRate),
}

/// The one word `qat.learning_rate` takes besides a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoLearningRate {
    Auto,
}

impl Default for QatLearningRate {
    fn default() -> Self {
        QatLearningRate::Auto(AutoLearningRate::Auto)
    }
}

/// Which of QAT's epochs is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QatSelect {
    #[default]
    Best,
    Last,
}

/// One random transform of a training image, as torchvision names it.
/// Each keeps the image's size, which the model's input fixes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Augmentation {
    /// `RandomResizedCrop(size, scale, ratio)`: a crop of a random share
    /// of the area (`scale`, within (0, 1]) and aspect ratio (`ratio`,
    /// width over height), resized back to the image size, bilinear.
    RandomResizedCrop {
        #[serde(default = "default_crop_scale")]
        scale: [f64; 2],
        #[serde(default = "default_crop_ratio")]
        ratio: [f64; 2],
    },
    /// `RandomHorizontalFlip()`: left-right, half the time.
    HorizontalFlip,
    /// `Pad(n)`: n pixels on every side, filled with the image's darkest
    /// value (its background; torchvision fills with 0 before
    /// normalisation). A `random_crop` must follow.
    Pad(#[schemars(range(min = 1, max = 1024))] u32),
    /// `RandomCrop(size)`: a random window of the padded image at the
    /// original size. Follows a `pad`.
    RandomCrop,
}

impl Augmentation {
    /// The random 2-pixel shifts and flips `qsweep train` uses.
    pub fn shifts_and_flips() -> Vec<Augmentation> {
        vec![Augmentation::Pad(2), Augmentation::RandomCrop, Augmentation::HorizontalFlip]
    }

    /// The transform in torchvision's notation, for reports.
    pub fn torchvision(&self) -> String {
        match self {
            Augmentation::RandomResizedCrop { scale, ratio } => {
                format!("RandomResizedCrop(scale=({}, {}), ratio=({}, {}))", scale[0], scale[1], ratio[0], ratio[1])
            }
            Augmentation::HorizontalFlip => "RandomHorizontalFlip()".to_string(),
            Augmentation::Pad(n) => format!("Pad({n})"),
            Augmentation::RandomCrop => "RandomCrop(size)".to_string(),
        }
    }
}

/// One partial combination of the axes, for `include` and `exclude`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatrixEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_fusion: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub qat_epochs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub float_layers: Option<FloatLayers>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethod {
    Max,
    Mse,
    Entropy,
    Percentile,
}

impl CalibrationMethod {
    pub const ALL: [CalibrationMethod; 4] =
        [CalibrationMethod::Max, CalibrationMethod::Mse, CalibrationMethod::Entropy, CalibrationMethod::Percentile];

    pub fn name(self) -> &'static str {
        match self {
            CalibrationMethod::Max => "max",
            CalibrationMethod::Mse => "mse",
            CalibrationMethod::Entropy => "entropy",
            CalibrationMethod::Percentile => "percentile",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    Fp32,
}

impl Baseline {
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Fp32 => "fp32",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    /// Batch sizes for latency and throughput; accuracy uses the largest.
    #[serde(default = "default_batch_sizes")]
    #[schemars(length(min = 1), extend("uniqueItems" = true), inner(range(min = 1, max = 10000)))]
    pub batch_sizes: Vec<u32>,
    /// Untimed runs before each latency measurement.
    #[serde(default = "default_warmup")]
    #[schemars(range(max = 10000))]
    pub warmup: u32,
    /// Timed runs per batch size; p99 needs at least 100 to mean anything.
    #[serde(default = "default_iterations")]
    #[schemars(range(min = 1, max = 100000))]
    pub iterations: u32,
    /// Intra-op threads; 0 means one per available core.
    #[serde(default)]
    #[schemars(range(max = 1024))]
    pub threads: u32,
    /// ONNX Runtime execution provider that builds and runs each model: cpu,
    /// cuda or tensorrt.
    #[serde(default)]
    pub engine: Engine,
    /// The model output that holds the class scores, for a model with
    /// several [default: the first].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl Default for EvaluateSpec {
    fn default() -> Self {
        Self {
            batch_sizes: default_batch_sizes(),
            warmup: default_warmup(),
            iterations: default_iterations(),
            threads: 0,
            engine: Engine::default(),
            output: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Int8Format {
    Tensorrt,
    OnnxruntimeCpu,
}

impl Int8Format {
    pub fn name(self) -> &'static str {
        match self {
            Int8Format::Tensorrt => "tensorrt",
            Int8Format::OnnxruntimeCpu => "onnxruntime-cpu",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Cpu,
    Cuda,
    Tensorrt,
}

impl Engine {
    /// The int8 format this engine's kernels need.
    pub fn native_int8_format(self) -> Int8Format {
        match self {
            Engine::Cpu => Int8Format::OnnxruntimeCpu,
            Engine::Cuda | Engine::Tensorrt => Int8Format::Tensorrt,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Cpu => "cpu",
            Engine::Cuda => "cuda",
            Engine::Tensorrt => "tensorrt",
        }
    }
}

impl SweepSpec {
    /// The int8 format in force: the spec's choice, else the engine's own.
    pub fn int8_format(&self) -> Int8Format {
        self.int8_format.unwrap_or_else(|| self.evaluate.engine.native_int8_format())
    }

    /// The sensitivity settings in force: the spec's, or the defaults.
    pub fn sensitivity_settings(&self) -> SensitivitySpec {
        self.sensitivity.clone().unwrap_or_default()
    }
}

fn default_depth() -> u32 {
    8
}
fn default_width() -> u32 {
    16
}
fn default_train_epochs() -> u32 {
    8
}
fn default_train_learning_rate() -> f64 {
    0.1
}
fn default_train_weight_decay() -> f64 {
    5e-4
}
fn default_train_samples() -> u32 {
    60_000
}
fn default_true() -> bool {
    true
}
fn default_qat_validation_samples() -> u32 {
    2_000
}
fn default_crop_scale() -> [f64; 2] {
    [0.08, 1.0]
}
fn default_crop_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn default_momentum() -> f64 {
    0.9
}
fn default_weight_decay() -> f64 {
    1e-4
}
fn default_train_batch() -> u32 {
    128
}
fn default_qat_samples() -> u32 {
    10_000
}
fn default_baselines() -> Vec<Baseline> {
    vec![Baseline::Fp32]
}
fn default_retries() -> u32 {
    1
}
fn default_timeout() -> u64 {
    3600
}
fn default_scale() -> f32 {
    255.0
}
fn default_mean() -> Vec<f32> {
    vec![0.0]
}
fn default_std() -> Vec<f32> {
    vec![1.0]
}
fn default_max_parallel() -> u32 {
    4
}
fn default_sensitivity_samples() -> u32 {
    256
}
fn default_validation_samples() -> u32 {
    1000
}
fn default_percentile() -> f64 {
    99.99
}
fn default_samples() -> u32 {
    500
}
fn default_batch_sizes() -> Vec<u32> {
    vec![1, 64]
}
fn default_warmup() -> u32 {
    10
}
fn default_iterations() -> u32 {
    200
}
