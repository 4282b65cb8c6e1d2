//! Turns runs into a DAG of stage tasks, each named by a content key.
//!
//! A task's key hashes what determines its output: its stage, that stage's
//! code version, its parameters, and the keys of its inputs. Two runs that
//! need the same work therefore name the same task, which runs once; a
//! rerun finds the task's artifact under the same key and skips it; and a
//! change anywhere upstream changes every key downstream of it.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::data::source::{Role, Source};
use crate::data::Split;
use crate::matrix::{Recipe, Run, RunKind};
use crate::spec::{Baseline, CalibrationMethod, Color, FloatLayers, ModelSource, QatLearningRate, SweepSpec};
use crate::stages;

/// The kinds of work a run is made of, in the order data flows through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    /// Trains the fp32 model a spec declares with `model: {"train": ...}`.
    Train,
    PrepareData,
    Calibrate,
    /// Ranks a PTQ recipe's quantized ops by what each costs.
    Sensitivity,
    /// `float_layers: "auto"`: ops left in float until a budget holds.
    Fallback,
    /// `qat.learning_rate: "auto"`: a short range test of QAT rates.
    LearningRate,
    Qat,
    Build,
    Evaluate,
    /// Does nothing and writes no artifact: the queue-throughput
    /// benchmark's task, never planned from a spec.
    Noop,
}

impl StageKind {
    pub const ALL: [StageKind; 9] = [
        StageKind::Train,
        StageKind::PrepareData,
        StageKind::Calibrate,
        StageKind::Sensitivity,
        StageKind::Fallback,
        StageKind::LearningRate,
        StageKind::Qat,
        StageKind::Build,
        StageKind::Evaluate,
    ];

    /// Which of several ready tasks to start first, lowest first: the
    /// ones nearest a result. An evaluate turns a build into a reported
    /// run and a build feeds one evaluate, while a QAT stage takes minutes
    /// and a calibration or data split feeds many runs; so a sweep's PTQ
    /// results come in seconds rather than after every QAT stage.
    pub fn urgency(self) -> u8 {
        match self {
            StageKind::Evaluate => 0,
            StageKind::Build => 1,
            StageKind::Calibrate => 2,
            StageKind::Sensitivity | StageKind::Fallback => 3,
            StageKind::PrepareData => 4,
            StageKind::Train => 5,
            StageKind::LearningRate | StageKind::Qat => 6,
            StageKind::Noop => 7,
        }
    }

    /// Whether the stage leaves an artifact (every stage but the
    /// benchmark's no-op).
    pub fn writes_artifact(self) -> bool {
        self != StageKind::Noop
    }

    pub fn name(self) -> &'static str {
        match self {
            StageKind::Train => "train",
            StageKind::PrepareData => "prepare-data",
            StageKind::Calibrate => "calibrate",
            StageKind::Sensitivity => "sensitivity",
            StageKind::Fallback => "fallback",
            StageKind::LearningRate => "learning-rate",
            StageKind::Qat => "qat",
            StageKind::Build => "build",
            StageKind::Evaluate => "evaluate",
            StageKind::Noop => "noop",
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A content key: the hex SHA-256 of everything that determines an output.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskKey(pub String);

impl TaskKey {
    /// The first 12 hex digits: enough to tell tasks apart on screen.
    pub fn short(&self) -> &str {
        &self.0[..12.min(self.0.len())]
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An input of a task: which role it plays and which task produces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub role: String,
    pub key: TaskKey,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub key: TaskKey,
    pub stage: StageKind,
    pub params: Value,
    pub inputs: Vec<Input>,
}

impl Task {
    pub fn input(&self, role: &str) -> Option<&TaskKey> {
        self.inputs.iter().find(|i| i.role == role).map(|i| &i.key)
    }
}

/// Fingerprints of the files a sweep reads; part of every key that
/// depends on them, so editing the model or the data invalidates results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sources {
    pub model_digest: String,
    pub evaluation: SourceRecord,
    pub calibration: SourceRecord,
    pub training: SourceRecord,
    /// The colour mode images are converted to: the spec's, or what the
    /// model's channel count implies.
    pub color: Color,
    /// The (height, width) image folders are prepared at: what the
    /// preprocessing fixes, or else the model's input size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<[u32; 2]>,
    /// Whether the evaluation samples have labels. Without them, quantized
    /// runs are measured against fp32's logits instead of labels.
    #[serde(default = "labelled")]
    pub evaluation_labelled: bool,
}

fn labelled() -> bool {
    true
}

/// A role's data source and its fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub source: Source,
    pub digest: String,
}

impl Sources {
    /// The sources of a sweep whose roles all read the default IDX
    /// dataset, with given fingerprints (for benchmarks and tests).
    pub fn idx(model_digest: &str, data_digest: &str) -> Self {
        let record = |split| SourceRecord {
            source: Source::Idx { dataset: Default::default(), dir: Default::default(), split },
            digest: data_digest.to_string(),
        };
        Sources {
            model_digest: model_digest.to_string(),
            evaluation: record(Split::Test),
            calibration: record(Split::Train),
            training: record(Split::Train),
            color: Color::Grey,
            image_size: None,
            evaluation_labelled: true,
        }
    }

    pub fn of(&self, role: Role) -> &SourceRecord {
        match role {
            Role::Evaluation => &self.evaluation,
            Role::Calibration => &self.calibration,
            Role::Training => &self.training,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRun {
    pub run: Run,
    /// The run's chain of tasks, upstream first; the last one is its evaluation.
    pub tasks: Vec<TaskKey>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub sweep: String,
    pub sources: Sources,
    /// Every distinct task, each after all of its inputs.
    pub tasks: Vec<Task>,
    pub runs: Vec<PlannedRun>,
    /// The manifests (digests, first 16 hex digits) the results directory
    /// held when the `qsweep run` that stored this plan started: an
    /// artifact whose manifest is among them was reused, which the HTML
    /// report's stage timeline shows as cached; any other was made by that
    /// run. A digest, not a time, so that a task redone in the same second
    /// still counts as made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub present_at_start: Vec<String>,
    #[serde(skip)]
    index: HashMap<TaskKey, usize>,
}

impl Plan {
    pub fn build(spec: &SweepSpec, runs: &[Run], sources: &Sources) -> Plan {
        let mut plan = Plan {
            sweep: spec.name.clone(),
            sources: sources.clone(),
            tasks: Vec::new(),
            runs: Vec::with_capacity(runs.len()),
            present_at_start: Vec::new(),
            index: HashMap::new(),
        };
        let mut data = json!({
            "dataset": spec.data.dataset,
            "preprocess": spec.data.preprocess,
            "color": sources.color,
        });
        if let Some(size) = sources.image_size {
            data["image_size"] = json!(size);
        }
        let test_data = plan.add(StageKind::PrepareData, prepare_params("test", &data, sources, None), vec![]);
        // A model the sweep trains is an input of every task that reads it.
        let trained = match &spec.model {
            ModelSource::Trained(trained) => {
                let training = sources.of(Role::Training);
                let params = json!({"train": trained.train, "data": data, "source_digest": training.digest});
                Some(plan.add(StageKind::Train, params, vec![]))
            }
            ModelSource::File(_) => None,
        };
        let fp32_model: Vec<Input> = trained.iter().map(|key| input(FP32_MODEL, key)).collect();
        let mut evaluate_params = json!({
            "batch_sizes": spec.evaluate.batch_sizes,
            "warmup": spec.evaluate.warmup,
            "iterations": spec.evaluate.iterations,
            "threads": spec.evaluate.threads,
            "engine": spec.evaluate.engine,
        });
        // Only when given, so that other sweeps' keys stay as they were.
        if let Some(output) = &spec.evaluate.output {
            evaluate_params["output"] = json!(output);
        }

        let fp32_build_params =
            json!({"precision": "fp32", "model_digest": sources.model_digest, "engine": spec.evaluate.engine});
        let mut fp32_evaluate_params = evaluate_params.clone();
        // Unlabelled samples: fp32 keeps its logits, which every other
        // run's evaluation reads as its reference (validation requires
        // the fp32 baseline then).
        let reference = (!sources.evaluation_labelled).then(|| {
            fp32_evaluate_params["keep_logits"] = json!(true);
            let built = plan.add(StageKind::Build, fp32_build_params.clone(), fp32_model.clone());
            let inputs = vec![input("model", &built), input("data", &test_data)];
            plan.add(StageKind::Evaluate, fp32_evaluate_params.clone(), inputs)
        });

        for run in runs {
            let mut chain: Vec<TaskKey> = trained.iter().cloned().chain([test_data.clone()]).collect();
            let (built, params) = match &run.kind {
                RunKind::Baseline(Baseline::Fp32) => (
                    plan.add(StageKind::Build, fp32_build_params.clone(), fp32_model.clone()),
                    fp32_evaluate_params.clone(),
                ),
                RunKind::Quantized(recipe) => {
                    let context =
                        QuantizedContext { spec, sources, data: &data, fp32_model: &fp32_model, test_data: &test_data };
                    (plan.add_quantized(&context, recipe, &mut chain), evaluate_params.clone())
                }
            };
            chain.push(built.clone());
            let mut inputs = vec![input("model", &built), input("data", &test_data)];
            if let Some(reference) = reference.as_ref().filter(|_| !matches!(run.kind, RunKind::Baseline(_))) {
                inputs.push(input(REFERENCE, reference));
            }
            let evaluated = plan.add(StageKind::Evaluate, params, inputs);
            chain.push(evaluated);
            plan.runs.push(PlannedRun { run: run.clone(), tasks: chain });
        }
        plan
    }

    /// calibrate (shared by every method) -> [sensitivity -> fallback]
    /// -> qat (when epochs > 0) -> build.
    fn add_quantized(&mut self, context: &QuantizedContext<'_>, recipe: &Recipe, chain: &mut Vec<TaskKey>) -> TaskKey {
        let QuantizedContext { spec, sources, data, fp32_model, .. } = *context;
        let subset = Some((spec.calibration.samples, spec.calibration.seed));
        let calibration_data =
            self.add(StageKind::PrepareData, prepare_params("calibration", data, sources, subset), vec![]);
        let calibrated = self.add(
            StageKind::Calibrate,
            json!({"model_digest": sources.model_digest}),
            [input("data", &calibration_data)].into_iter().chain(fp32_model.iter().cloned()).collect(),
        );
        chain.extend([calibration_data, calibrated.clone()]);
        let quantizer = json!({"calibration": recipe.calibration, "residual_fusion": recipe.residual_fusion});
        // What leaves ops in float: params and inputs of QAT and build.
        let (float_params, float_inputs) = self.add_float_layers(context, recipe, &calibrated, &quantizer, chain);
        let mut build_inputs: Vec<Input> = [input("calibration", &calibrated)]
            .into_iter()
            .chain(fp32_model.iter().cloned())
            .chain(float_inputs.iter().cloned())
            .collect();
        if recipe.qat_epochs > 0 {
            let training = self.add_qat_data(context, &calibrated);
            let mut qat_params = json!({
                "model_digest": sources.model_digest,
                "quantizer": quantizer,
                "format": spec.int8_format(),
                "epochs": recipe.qat_epochs,
                "learning_rate": spec.qat.learning_rate,
                "momentum": spec.qat.momentum,
                "weight_decay": spec.qat.weight_decay,
                "batch_size": spec.qat.batch_size,
                "seed": spec.qat.seed,
                "augment": spec.qat.augment,
                "select": spec.qat.select,
            });
            if recipe.calibration == CalibrationMethod::Percentile {
                qat_params["percentile"] = json!(spec.calibration.percentile);
            }
            extend(&mut qat_params, &float_params);
            let trained = self.add(
                StageKind::Qat,
                qat_params,
                [input("calibration", &calibrated)]
                    .into_iter()
                    .chain(training.inputs.iter().cloned())
                    .chain(fp32_model.iter().cloned())
                    .chain(float_inputs.iter().cloned())
                    .collect(),
            );
            chain.extend(training.tasks);
            chain.push(trained.clone());
            build_inputs.push(input("model", &trained));
        }
        let mut build_params = json!({
            "precision": "int8",
            "model_digest": sources.model_digest,
            "quantizer": quantizer,
            "format": spec.int8_format(),
            "engine": spec.evaluate.engine,
        });
        // Only the percentile method reads the percentile, so only its
        // builds are invalidated when it changes.
        if recipe.calibration == CalibrationMethod::Percentile {
            build_params["percentile"] = json!(spec.calibration.percentile);
        }
        extend(&mut build_params, &float_params);
        self.add(StageKind::Build, build_params, build_inputs)
    }

    /// What every QAT stage of the sweep trains and validates on: the
    /// training subset, the validation subset, and with
    /// `learning_rate: "auto"` the range test that picks the rate (shared
    /// by every QAT run, whatever its recipe).
    fn add_qat_data(&mut self, context: &QuantizedContext<'_>, calibrated: &TaskKey) -> QatData {
        let QuantizedContext { spec, sources, data, fp32_model, .. } = *context;
        let subset = Some((spec.qat.samples, spec.qat.seed));
        let training = self.add(StageKind::PrepareData, prepare_params("train", data, sources, subset), vec![]);
        let validation = self.add(StageKind::PrepareData, qat_validation_params(spec, data, sources), vec![]);
        let mut inputs = vec![input("data", &training), input(QAT_VALIDATION, &validation)];
        let mut tasks = vec![training.clone(), validation.clone()];
        if spec.qat.learning_rate == QatLearningRate::default() {
            let params = json!({
                "model_digest": sources.model_digest,
                "format": spec.int8_format(),
                "candidates": stages::learning_rate::CANDIDATES,
                "share": stages::learning_rate::SHARE,
                "momentum": spec.qat.momentum,
                "weight_decay": spec.qat.weight_decay,
                "batch_size": spec.qat.batch_size,
                "seed": spec.qat.seed,
                "augment": spec.qat.augment,
            });
            let tested = self.add(
                StageKind::LearningRate,
                params,
                [input("calibration", calibrated)]
                    .into_iter()
                    .chain(inputs.iter().cloned())
                    .chain(fp32_model.iter().cloned())
                    .collect(),
            );
            inputs.push(input(LEARNING_RATE, &tested));
            tasks.push(tested);
        }
        QatData { inputs, tasks }
    }

    /// The sensitivity ranking of a recipe's PTQ ancestry (for every
    /// recipe when the spec has a `sensitivity` section, else where
    /// `float_layers` needs it), and for "auto" the fallback search. Returns
    /// what QAT and build add to their params and inputs: nothing with
    /// no ops in float, so those keys stay as they were.
    fn add_float_layers(
        &mut self,
        context: &QuantizedContext<'_>,
        recipe: &Recipe,
        calibrated: &TaskKey,
        quantizer: &Value,
        chain: &mut Vec<TaskKey>,
    ) -> (Value, Vec<Input>) {
        let QuantizedContext { spec, sources, data, fp32_model, test_data } = *context;
        if spec.sensitivity.is_none() && recipe.float_layers.is_none() {
            return (json!({}), Vec::new());
        }
        let settings = spec.sensitivity_settings();
        let validation = self.add(StageKind::PrepareData, validation_params(spec, data, sources), vec![]);
        let mut ptq =
            json!({"model_digest": sources.model_digest, "quantizer": quantizer, "format": spec.int8_format()});
        if recipe.calibration == CalibrationMethod::Percentile {
            ptq["percentile"] = json!(spec.calibration.percentile);
        }
        if let Some(output) = &spec.evaluate.output {
            ptq["output"] = json!(output);
        }
        let mut sensitivity_params = ptq.clone();
        sensitivity_params["samples"] = json!(settings.samples);
        let ranked = self.add(
            StageKind::Sensitivity,
            sensitivity_params,
            [input("calibration", calibrated), input("data", &validation)]
                .into_iter()
                .chain(fp32_model.iter().cloned())
                .collect(),
        );
        chain.extend([validation.clone(), ranked.clone()]);
        let float_params =
            json!({"float_layers": recipe.float_layers, "fallback_precision": settings.fallback_precision});
        match recipe.float_layers {
            FloatLayers::Count(0) => (json!({}), Vec::new()),
            FloatLayers::Count(_) => (float_params, vec![input("sensitivity", &ranked)]),
            FloatLayers::Auto(_) => {
                let mut search_params = ptq;
                // Validation refuses "auto" without a budget.
                search_params["accuracy_budget"] = json!(settings.accuracy_budget.unwrap_or(0.0));
                search_params["max_float_layers"] = json!(settings.max_float_layers);
                search_params["fallback_precision"] = json!(settings.fallback_precision);
                let searched = self.add(
                    StageKind::Fallback,
                    search_params,
                    [
                        input("calibration", calibrated),
                        input("sensitivity", &ranked),
                        input("data", &validation),
                        input("test", test_data),
                    ]
                    .into_iter()
                    .chain(fp32_model.iter().cloned())
                    .collect(),
                );
                chain.push(searched.clone());
                (float_params, vec![input("fallback", &searched)])
            }
        }
    }

    /// Adds a task unless one with the same key exists; returns its key.
    fn add(&mut self, stage: StageKind, params: Value, inputs: Vec<Input>) -> TaskKey {
        let key = content_key(stage, &params, &inputs);
        if !self.index.contains_key(&key) {
            self.index.insert(key.clone(), self.tasks.len());
            self.tasks.push(Task { key: key.clone(), stage, params, inputs });
        }
        key
    }

    pub fn task(&self, key: &TaskKey) -> Option<&Task> {
        self.index.get(key).map(|&i| &self.tasks[i])
    }

    /// Restores the lookup index after deserializing a stored plan.
    pub fn reindex(&mut self) {
        self.index = self.tasks.iter().enumerate().map(|(i, t)| (t.key.clone(), i)).collect();
    }

    /// How many runs need each task; a count above one is shared work.
    pub fn run_counts(&self) -> HashMap<&TaskKey, usize> {
        let mut counts = HashMap::new();
        for run in &self.runs {
            for key in &run.tasks {
                *counts.entry(key).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// A prepare-data task's parameters: which role (`split`), the shared
/// preprocessing, the role's source with its fingerprint, and the subset
/// (the source's own, else the section's `samples` and `seed`).
fn prepare_params(split: &str, data: &Value, sources: &Sources, section: Option<(u32, u64)>) -> Value {
    let role = match split {
        "test" => Role::Evaluation,
        "calibration" => Role::Calibration,
        _ => Role::Training,
    };
    let record = sources.of(role);
    let mut params = json!({"split": split, "data": data, "source": record.source, "source_digest": record.digest});
    if let Some((samples, seed)) = record.source.subset(section) {
        params["samples"] = json!(samples);
        params["seed"] = json!(seed);
    }
    params
}

/// What every quantized run's tasks are planned from.
#[derive(Clone, Copy)]
struct QuantizedContext<'a> {
    spec: &'a SweepSpec,
    sources: &'a Sources,
    data: &'a Value,
    fp32_model: &'a [Input],
    test_data: &'a TaskKey,
}

/// Adds `extra`'s keys to the object `params`.
fn extend(params: &mut Value, extra: &Value) {
    if let (Some(params), Some(extra)) = (params.as_object_mut(), extra.as_object()) {
        params.extend(extra.clone());
    }
}

/// The validation subset's prepare-data parameters: a seeded draw from the
/// calibration source that holds the calibration subset out.
fn validation_params(spec: &SweepSpec, data: &Value, sources: &Sources) -> Value {
    let settings = spec.sensitivity_settings();
    let record = sources.of(Role::Calibration);
    let mut params = json!({
        "split": "validation",
        "data": data,
        "source": record.source,
        "source_digest": record.digest,
        "samples": settings.validation_samples,
        "seed": settings.seed,
    });
    if let Some((samples, seed)) = record.source.subset(Some((spec.calibration.samples, spec.calibration.seed))) {
        params["held_out"] = json!({"samples": samples, "seed": seed});
    }
    params
}

/// The inputs a QAT stage gets besides its PTQ model's, and the tasks
/// that make them, for the run's chain.
struct QatData {
    inputs: Vec<Input>,
    tasks: Vec<TaskKey>,
}

/// The input role of QAT's validation subset.
pub const QAT_VALIDATION: &str = "validation";

/// The input role of the range test that picked QAT's learning rate.
pub const LEARNING_RATE: &str = "learning_rate";

/// A seeded draw that QAT's validation subset holds out of the training
/// source: what it is, and the spec field that sizes it (for errors).
pub struct HeldOutDraw {
    pub samples: u32,
    pub seed: u64,
    /// "calibration" or "fine-tuning".
    pub what: &'static str,
    pub field: &'static str,
}

/// The draws QAT's validation subset holds out: the calibration set,
/// where calibration lists the training source's images alike, then the
/// fine-tuning subset. The plan and the spec check both take them from
/// here, so what is checked is what runs.
pub fn qat_held_out(spec: &SweepSpec, calibration: &Source, training: &Source) -> Vec<HeldOutDraw> {
    // A source's own samples field overrides its section's.
    let field = |source: &Source, own: &'static str, section: &'static str| {
        if source.subset(None).is_some() {
            own
        } else {
            section
        }
    };
    let mut held_out = Vec::new();
    if calibration.listed_alike(training) {
        let field = field(calibration, "data.calibration.samples", "calibration.samples");
        held_out.extend(
            calibration
                .subset(Some((spec.calibration.samples, spec.calibration.seed)))
                .map(|(samples, seed)| HeldOutDraw { samples, seed, what: "calibration", field }),
        );
    }
    let field = field(training, "data.training.samples", "qat.samples");
    held_out.extend(training.subset(Some((spec.qat.samples, spec.qat.seed))).map(|(samples, seed)| HeldOutDraw {
        samples,
        seed,
        what: "fine-tuning",
        field,
    }));
    held_out
}

/// QAT's validation subset: a seeded draw from the training source that
/// holds out `qat_held_out`'s draws. (Validation refuses a training source
/// that reads the evaluation source's images.)
fn qat_validation_params(spec: &SweepSpec, data: &Value, sources: &Sources) -> Value {
    let training = sources.of(Role::Training);
    let held_out = qat_held_out(spec, &sources.of(Role::Calibration).source, &training.source);
    json!({
        "split": "qat-validation",
        "data": data,
        "source": training.source,
        "source_digest": training.digest,
        "samples": spec.qat.validation_samples,
        "seed": spec.qat.seed,
        "held_out": held_out.iter().map(|d| json!({"samples": d.samples, "seed": d.seed})).collect::<Vec<_>>(),
    })
}

/// The input role of fp32's evaluation, whose logits an evaluation on
/// unlabelled samples is measured against.
pub const REFERENCE: &str = "reference";

/// The input role of a model the sweep trained.
pub const FP32_MODEL: &str = "fp32_model";

fn input(role: &str, key: &TaskKey) -> Input {
    Input { role: role.to_string(), key: key.clone() }
}

/// The version of each stage's code; see `stages` for the rule on bumping.
pub fn stage_version(stage: StageKind) -> u32 {
    match stage {
        StageKind::Train => stages::train::VERSION,
        StageKind::PrepareData => stages::prepare_data::VERSION,
        StageKind::Build => stages::build::VERSION,
        StageKind::Evaluate => stages::evaluate::VERSION,
        StageKind::Noop => 1,
        StageKind::Calibrate => stages::calibrate::VERSION,
        StageKind::Qat => stages::qat::VERSION,
        StageKind::Sensitivity => stages::sensitivity::VERSION,
        StageKind::Fallback => stages::fallback::VERSION,
        StageKind::LearningRate => stages::learning_rate::VERSION,
    }
}

fn content_key(stage: StageKind, params: &Value, inputs: &[Input]) -> TaskKey {
    let mut hasher = Sha256::new();
    hasher.update(stage.name().as_bytes());
    hasher.update(stage_version(stage).to_le_bytes());
    hasher.update(params.to_string().as_bytes());
    for input in inputs {
        hasher.update(b"\0");
        hasher.update(input.role.as_bytes());
        hasher.update(b"=");
        hasher.update(input.key.0.as_bytes());
    }
    TaskKey(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix;

    fn sources(model_digest: &str) -> Sources {
        Sources::idx(model_digest, "d")
    }

    fn plan_of(json: &str) -> Plan {
        let spec: SweepSpec = serde_json::from_str(json).unwrap();
        let runs = matrix::expand(&spec).unwrap();
        Plan::build(&spec, &runs, &sources("m"))
    }

    #[test]
    fn methods_share_one_calibration_and_fp32_runs_once() {
        let plan = plan_of(
            r#"{"name":"s","model":"m.onnx","matrix":{"calibration":["max","mse","entropy","percentile"],"qat_epochs":[0,2]}}"#,
        );
        let count = |stage| plan.tasks.iter().filter(|t| t.stage == stage).count();
        assert_eq!(plan.runs.len(), 9);
        assert_eq!(count(StageKind::Calibrate), 1);
        // Test split, calibration set, and QAT's fine-tuning and validation subsets.
        assert_eq!(count(StageKind::PrepareData), 4);
        assert_eq!(count(StageKind::Qat), 4);
        assert_eq!(count(StageKind::LearningRate), 1, "one range test serves every QAT run");
        assert_eq!(count(StageKind::Build), 1 + 8);
        assert_eq!(count(StageKind::Evaluate), 9);
        // Runs differing only in qat_epochs share their PTQ ancestors.
        let ptq = &plan.runs.iter().find(|r| r.run.id == "mse-unfused-ptq").unwrap().tasks;
        let qat = &plan.runs.iter().find(|r| r.run.id == "mse-unfused-qat2").unwrap().tasks;
        assert_eq!(ptq[..3], qat[..3]);
    }

    #[test]
    fn keys_change_with_params_and_sources() {
        let a = plan_of(r#"{"name":"s","model":"m.onnx"}"#);
        let b = plan_of(r#"{"name":"s","model":"m.onnx","evaluate":{"warmup":3}}"#);
        let eval = |p: &Plan| p.runs[0].tasks.last().unwrap().clone();
        let build = |p: &Plan| p.runs[0].tasks[1].clone();
        assert_ne!(eval(&a), eval(&b));
        assert_eq!(build(&a), build(&b));

        let spec: SweepSpec = serde_json::from_str(r#"{"name":"s","model":"m.onnx"}"#).unwrap();
        let runs = matrix::expand(&spec).unwrap();
        let other = Plan::build(&spec, &runs, &sources("m2"));
        assert_ne!(build(&a), build(&other));
        assert_ne!(eval(&a), eval(&other), "a new model must invalidate its evaluation too");
    }

    #[test]
    fn tasks_come_after_their_inputs() {
        let plan = plan_of(r#"{"name":"s","model":"m.onnx","matrix":{"calibration":["max"],"qat_epochs":[1]}}"#);
        for (position, task) in plan.tasks.iter().enumerate() {
            for input in &task.inputs {
                assert!(plan.tasks[..position].iter().any(|t| t.key == input.key));
            }
        }
    }
}
