//! The validated sweep: a spec whose every part has been checked against
//! the files it names and the stages this qsweep can execute.
//!
//! `load` is the one door from a spec file to work: it collects every error
//! it can find, each pointing into the file, before anything is written.

use std::path::{Path, PathBuf};

use crate::data::{self, Split};
use crate::matrix::{self, Run};
use crate::onnx::graph::{weighted_ops, GraphIndex};
use crate::onnx::{self, Dim, TensorSpec};
use crate::plan::Sources;
use crate::quant::qdq;
use crate::spec::{self, Diagnostic, JsonPath, ModelSource, ParsedSpec, SpecErrors, SweepSpec};

pub struct Sweep {
    pub spec_file: PathBuf,
    pub spec: SweepSpec,
    pub model_path: PathBuf,
    pub data_dir: PathBuf,
    pub runs: Vec<Run>,
}

/// Reads, checks and resolves a spec file.
pub fn load(file: &Path) -> Result<Sweep, SpecErrors> {
    resolve(spec::read(file)?)
}

/// Checks and resolves spec text that did not come from a file (a worker
/// gets it from Redis); `label` names it in errors.
pub fn load_text(label: &Path, text: String) -> Result<Sweep, SpecErrors> {
    resolve(spec::parse(label, text)?)
}

fn resolve(parsed: ParsedSpec) -> Result<Sweep, SpecErrors> {
    let mut errors = semantic_errors(&parsed);

    let runs = match matrix::expand(&parsed.spec) {
        Ok(runs) => runs,
        Err(incomplete) => {
            for include in incomplete {
                errors.push(parsed.diagnostic(
                    JsonPath::parse("include").index(include.index),
                    "this entry matches no run of the matrix, so it would add a run, but it names no calibration method",
                    "add \"calibration\" to the entry, or add the values it names to the matrix",
                ));
            }
            Vec::new()
        }
    };
    if runs.is_empty() && errors.is_empty() {
        errors.push(no_runs(&parsed));
    }
    let base = parsed.base_dir();
    // A model the sweep trains itself has no file yet; its stage writes one.
    let model_path = match &parsed.spec.model {
        ModelSource::File(path) => base.join(path),
        ModelSource::Trained(_) => PathBuf::new(),
    };
    let data_dir = parsed
        .spec
        .data
        .dir
        .as_ref()
        .map_or_else(|| PathBuf::from(parsed.spec.data.dataset.default_dir()), |dir| base.join(dir));

    let mut dataset_shape = None;
    match data::load_split(parsed.spec.data.dataset, &data_dir, Split::Test) {
        Ok(test) => dataset_shape = Some((test.height, test.width)),
        Err(e) => {
            errors.push(parsed.diagnostic(JsonPath::parse("data"), e.to_string(), e.fix(parsed.spec.data.dataset)))
        }
    }
    if let Err(e) = data::split_files(parsed.spec.data.dataset, &data_dir, Split::Train) {
        errors.push(parsed.diagnostic(JsonPath::parse("data"), e.to_string(), e.fix(parsed.spec.data.dataset)));
    }

    if let ModelSource::Trained(trained) = &parsed.spec.model {
        let architecture = crate::train::resnet::Architecture {
            depth: trained.train.depth as usize,
            width: trained.train.width as usize,
            channels: 1,
            height: 28,
            width_px: 28,
            classes: 10,
        };
        if let Err(problem) = architecture.check() {
            errors.push(parsed.diagnostic(JsonPath::parse("model.train.depth"), problem, "use a depth of 8, 20 or 32"));
        }
    }
    match &parsed.spec.model {
        ModelSource::Trained(_) => None,
        ModelSource::File(_) => match onnx::Model::load(&model_path) {
            Ok(model) => {
                if runs.iter().any(|r| r.recipe().is_some()) {
                    check_quantizable(&parsed, &model, &mut errors);
                }
                // Before any training starts, not at the QAT stage of each run.
                if runs.iter().any(|r| r.recipe().is_some_and(|recipe| recipe.qat_epochs > 0)) {
                    if let Err(e) = crate::train::network::check_operators(&model.proto) {
                        errors.push(parsed.diagnostic(
                            JsonPath::parse("model"),
                            format!("QAT cannot fine-tune this model: {e}"),
                            "use qat_epochs 0 (PTQ) for it, or export it with the supported operators",
                        ));
                    }
                }
                check_model(&parsed, &model, dataset_shape, &mut errors)
            }
            Err(e) => {
                errors.push(parsed.diagnostic(
                    JsonPath::parse("model"),
                    e.to_string(),
                    "point `model` at an fp32 ONNX file (paths are relative to the spec file), or re-export the model",
                ));
                None
            }
        },
    };

    if !errors.is_empty() {
        errors.sort_by_key(|d| (d.line, d.column));
        return Err(parsed.errors(errors));
    }
    Ok(Sweep { spec_file: parsed.file.clone(), spec: parsed.spec, model_path, data_dir, runs })
}

/// Checks that need only the typed spec.
fn semantic_errors(parsed: &ParsedSpec) -> Vec<Diagnostic> {
    let spec = &parsed.spec;
    let mut errors = Vec::new();
    let preprocess = &spec.data.preprocess;
    for (index, std) in preprocess.std.iter().enumerate() {
        if *std <= 0.0 || !std.is_finite() {
            errors.push(parsed.diagnostic(
                JsonPath::parse("data.preprocess.std").index(index),
                format!("std {std} would divide by zero or flip the sign"),
                "use the dataset's positive standard deviation, e.g. 0.353 for Fashion-MNIST",
            ));
        }
    }
    if preprocess.mean.len() != 1 || preprocess.std.len() != 1 {
        errors.push(
            parsed
                .diagnostic(
                    JsonPath::parse("data.preprocess"),
                    format!(
                        "{} has 1 channel, but mean has {} value(s) and std {}",
                        spec.data.dataset.name(),
                        preprocess.mean.len(),
                        preprocess.std.len()
                    ),
                    "give one mean and one std",
                )
                .expected("one value per channel"),
        );
    }
    if spec.matrix.calibration.is_empty() {
        for axis in ["residual_fusion", "qat_epochs"] {
            let given = match axis {
                "residual_fusion" => !spec.matrix.residual_fusion.is_empty(),
                _ => !spec.matrix.qat_epochs.is_empty(),
            };
            if given {
                errors.push(parsed.diagnostic(
                    JsonPath::parse("matrix").key(axis),
                    format!("`{axis}` is given but `calibration` is empty, so no quantized run uses it"),
                    "add calibration methods to matrix.calibration, or remove this axis",
                ));
            }
        }
    }
    if let Some(resources) = &spec.resources {
        for (field, quantity) in [("cpu", &resources.cpu), ("memory", &resources.memory)] {
            if let Some(quantity) = quantity.as_deref().filter(|q| !is_quantity(q)) {
                errors.push(
                    parsed
                        .diagnostic(
                            JsonPath::parse("resources").key(field),
                            format!("\"{quantity}\" is not a Kubernetes quantity"),
                            "write a number with an optional suffix, e.g. \"4\", \"3500m\", \"16Gi\"",
                        )
                        .expected("digits with an optional suffix: m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei, or an exponent"),
                );
            }
        }
    }
    for (list, entries) in [("include", &spec.include), ("exclude", &spec.exclude)] {
        for (index, entry) in entries.iter().enumerate() {
            if entry == &spec::MatrixEntry::default() {
                errors.push(parsed.diagnostic(
                    JsonPath::parse(list).index(index),
                    "an empty entry names no axis value",
                    "name at least one of calibration, residual_fusion, qat_epochs, or remove the entry",
                ));
            }
        }
    }
    errors
}

/// Whether `text` is a Kubernetes resource quantity: a non-negative decimal
/// number with an optional binary (Ki..Ei), decimal (m, k, M..E) or
/// exponent (e3, E-2) suffix.
pub fn is_quantity(text: &str) -> bool {
    let number_end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let exponent = suffix.strip_prefix(['e', 'E']).map(|rest| rest.strip_prefix(['+', '-']).unwrap_or(rest));
    let suffix_ok =
        matches!(suffix, "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei")
            || exponent.is_some_and(|digits| !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

fn no_runs(parsed: &ParsedSpec) -> Diagnostic {
    let spec = &parsed.spec;
    let (path, problem, fix) = if !spec.exclude.is_empty() && !spec.matrix.calibration.is_empty() {
        (
            "exclude",
            "`exclude` removes every run of the matrix, so the sweep has nothing to do",
            "loosen or remove exclude entries",
        )
    } else {
        (
            "baselines",
            "the sweep has no run: no baseline and no quantization axes",
            "add \"baselines\": [\"fp32\"], or list methods in matrix.calibration",
        )
    };
    parsed.diagnostic(JsonPath::parse(path), problem, fix)
}

/// Quantized runs need per-channel Q/DQ (opset 13) and something to quantize.
fn check_quantizable(parsed: &ParsedSpec, model: &onnx::Model, errors: &mut Vec<Diagnostic>) {
    let opset = model.opset().unwrap_or(0);
    if opset < qdq::MIN_OPSET {
        errors.push(parsed.diagnostic(
            JsonPath::parse("model"),
            format!("the model uses opset {opset}, which cannot express per-channel Q/DQ (opset {} or later)", qdq::MIN_OPSET),
            format!(
                "re-export the model with opset_version={} or later (e.g. torch.onnx.export(..., opset_version=17)), or upgrade it with onnx.version_converter",
                qdq::MIN_OPSET
            ),
        ));
    }
    let graph = model.proto.graph.as_ref().expect("a loaded model has a graph");
    if weighted_ops(&GraphIndex::new(graph)).is_empty() {
        errors.push(parsed.diagnostic(
            JsonPath::parse("model"),
            qdq::QdqError::NothingToQuantize.to_string(),
            "quantize a model with Conv, Gemm or MatMul layers, or keep only the fp32 baseline",
        ));
    }
}

/// The model must take one float image batch the dataset can feed, and
/// give one score per class.
fn check_model(
    parsed: &ParsedSpec,
    model: &onnx::Model,
    dataset_shape: Option<(usize, usize)>,
    errors: &mut Vec<Diagnostic>,
) -> Option<TensorSpec> {
    let path = JsonPath::parse("model");
    let mut fail = |problem: String, fix: &str| errors.push(parsed.diagnostic(path.clone(), problem, fix));
    let inputs = model.inputs();
    let [input] = inputs.as_slice() else {
        fail(
            format!("the model has {} runtime inputs; qsweep feeds exactly one image tensor", inputs.len()),
            "export the model with a single image input",
        );
        return None;
    };
    if input.elem_type != onnx::FLOAT {
        fail(
            format!("input `{}` has element type {}, not float32", input.name, input.elem_type),
            "use the fp32 export of the model",
        );
    }
    let (height, width) = dataset_shape.unwrap_or((28, 28));
    let expected = format!("[batch, 1, {height}, {width}]");
    let shape_ok = match input.shape.as_deref() {
        Some([_, channels, h, w]) => {
            *channels == Dim::Fixed(1) && *h == Dim::Fixed(height as i64) && *w == Dim::Fixed(width as i64)
        }
        _ => false,
    };
    if !shape_ok {
        fail(
            format!(
                "input `{}` has shape {}, but {} images are {expected}",
                input.name,
                input.shape_text(),
                parsed.spec.data.dataset.name()
            ),
            "use a model trained on this dataset, or pick the dataset the model was trained on in data.dataset",
        );
    }
    if let Some(Some(Dim::Fixed(fixed))) = input.shape.as_ref().map(|s| s.first().cloned()) {
        let fixed = fixed as u32;
        if parsed.spec.evaluate.batch_sizes.iter().any(|&b| b != fixed) {
            errors.push(parsed.diagnostic(
                JsonPath::parse("evaluate.batch_sizes"),
                format!("the model's batch axis is fixed at {fixed}, so it cannot run other batch sizes"),
                format!("set evaluate.batch_sizes to [{fixed}], or re-export the model with a dynamic batch axis"),
            ));
        }
    }
    let outputs = model.outputs();
    if let Some(Some(Dim::Fixed(classes))) = outputs.first().and_then(|o| o.shape.as_ref().map(|s| s.last().cloned())) {
        if classes != 10 {
            errors.push(parsed.diagnostic(
                JsonPath::parse("model"),
                format!("the model scores {classes} classes, but {} has 10", parsed.spec.data.dataset.name()),
                "use a model with a 10-class head",
            ));
        }
    }
    Some(input.clone())
}

impl Sweep {
    /// The spec with the model and data paths made absolute, for workers
    /// that read it from elsewhere than the spec's directory.
    pub fn portable_spec(&self) -> std::io::Result<String> {
        let mut spec = self.spec.clone();
        if let ModelSource::File(_) = spec.model {
            spec.model = ModelSource::File(std::path::absolute(&self.model_path)?.display().to_string());
        }
        spec.data.dir = Some(std::path::absolute(&self.data_dir)?.display().to_string());
        Ok(serde_json::to_string(&spec).expect("a spec serializes"))
    }

    /// The results directory used when `--results` is not given.
    pub fn default_results_dir(&self) -> PathBuf {
        PathBuf::from("results").join(&self.spec.name)
    }

    /// Content fingerprints of the model and the dataset files.
    pub fn sources(&self) -> std::io::Result<Sources> {
        let model_digest = match &self.spec.model {
            ModelSource::File(_) => crate::store::hash_file(&self.model_path)?.1,
            // What the training stage is asked for stands for what it writes.
            ModelSource::Trained(trained) => {
                let text = serde_json::to_string(trained).expect("a spec serializes");
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()))
            }
        };
        let mut data_digest = String::new();
        for split in [Split::Train, Split::Test] {
            let (images, labels) =
                data::split_files(self.spec.data.dataset, &self.data_dir, split).map_err(std::io::Error::other)?;
            for file in [images, labels] {
                data_digest.push_str(&crate::store::hash_file(&file)?.1[..16]);
            }
        }
        Ok(Sources { model_digest, data_digest })
    }
}

#[cfg(test)]
mod tests {
    use super::is_quantity;

    #[test]
    fn kubernetes_quantities() {
        for good in ["4", "3500m", "16Gi", "0.5", "1e3", "2E-2", "128Mi", "1k"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "four", "16GB", "1.2.3", "-1", "Gi", "1e", "16 Gi"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
