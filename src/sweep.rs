//! The validated sweep: a spec whose every part has been checked against
//! the files it names and the stages this qsweep can execute.
//!
//! `load` is the one door from a spec file to work: it collects every error
//! it can find, each pointing into the file, before anything is written.

use std::path::{Path, PathBuf};

use crate::data::image_folder::ImageFolder;
use crate::data::source::{Role, Source};
use crate::data::tensor_source::TensorSet;
use crate::data::{self, image, Split};
use crate::matrix::{self, Run};
use crate::onnx::graph::{weighted_ops, GraphIndex};
use crate::onnx::{self, Dim};
use crate::plan::{SourceRecord, Sources};
use crate::quant::qdq;
use crate::spec::{self, Color, Diagnostic, JsonPath, Layout, ModelSource, ParsedSpec, SpecErrors, SweepSpec};

pub struct Sweep {
    pub spec_file: PathBuf,
    pub spec: SweepSpec,
    pub model_path: PathBuf,
    /// Where the IDX dataset's files are (used by roles with no source).
    pub data_dir: PathBuf,
    /// What relative paths in the spec are relative to.
    pub base_dir: PathBuf,
    /// The colour mode images are converted to: the spec's, or what the
    /// model's channels imply.
    pub color: Color,
    /// The (height, width) image folders are prepared at, if any role
    /// reads one: what the preprocessing fixes, or the model's input size.
    pub image_size: Option<[u32; 2]>,
    /// The model's input name, which tensor files may key inputs by.
    pub model_input: String,
    /// The axes of one input sample (the input's, less the batch axis).
    pub sample_rank: usize,
    /// Whether the evaluation samples have labels (else runs are measured
    /// against fp32's outputs).
    pub evaluation_labelled: bool,
    /// What validation changed or noticed that the user should know.
    pub notes: Vec<String>,
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

    // The model first: tensor files may key their inputs by its input name.
    let model = match &parsed.spec.model {
        ModelSource::Trained(_) => None,
        ModelSource::File(_) => match onnx::Model::load(&model_path) {
            Ok(model) => Some(model),
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
    let model_input = match &model {
        Some(model) => {
            model.inputs().first().map(|input| (input.name.clone(), input.shape.as_ref().map_or(4, Vec::len)))
        }
        None => Some((crate::train::resnet::INPUT.to_string(), 4)),
    };
    let (input_name, input_rank) = model_input.unwrap_or_else(|| (String::new(), 4));
    let sources: Vec<(Role, Source)> = Role::ALL
        .iter()
        .map(|&role| {
            (role, Source::of(role, &parsed.spec.data, &data_dir, &base, (&input_name, input_rank.saturating_sub(1))))
        })
        .collect();
    let opened = open_sources(&parsed, &sources, &data_dir, &mut errors);

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
    let model_input = model.as_ref().and_then(|model| {
        if runs.iter().any(|r| r.recipe().is_some()) {
            check_quantizable(&parsed, model, &mut errors);
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
        check_model(&parsed, model, &opened, &mut errors)
    });
    check_float_layers(&parsed, &runs, model.as_ref(), (&sources, &opened, &data_dir), &mut errors);
    check_qat(&parsed, &runs, (&sources, &opened, &data_dir), &mut errors);

    let evaluation_labelled =
        !opened.tensors.iter().any(|(role, set)| *role == Role::Evaluation && set.labels.is_none());
    if !evaluation_labelled && !parsed.spec.baselines.contains(&spec::Baseline::Fp32) {
        errors.push(parsed.diagnostic(
            JsonPath::parse("baselines"),
            "the evaluation samples have no labels, so runs are measured against fp32's outputs, but the sweep has no fp32 baseline",
            "add \"fp32\" to baselines, or give the evaluation samples labels",
        ));
    }
    if !errors.is_empty() {
        errors.sort_by_key(|d| (d.line, d.column));
        return Err(parsed.errors(errors));
    }
    let facts = model_input.unwrap_or(ModelFacts { color: None, size: None, batch_one_only: None });
    let (model_color, model_size) = (facts.color, facts.size);
    let mut notes = Vec::new();
    let mut parsed = parsed;
    if let Some(reason) = facts.batch_one_only {
        notes.push(format!(
            "the model's batch axis is fixed at 1 and {reason}, so latency and throughput are measured at batch 1 only (re-export with dynamic_axes to measure more)"
        ));
        parsed.spec.evaluate.batch_sizes = vec![1];
    }
    let color = parsed.spec.data.preprocess.color.or(model_color).unwrap_or(Color::Grey);
    if parsed.spec.data.preprocess.color.is_none() && color != Color::Grey {
        for (role, folder) in &opened.folders {
            if let Some(grey) = folder.samples.first().filter(|s| image::is_grey(&s.path)) {
                notes.push(format!(
                    "{} images are grey (e.g. {}) and the model takes colour: they are converted as PIL's convert(\"RGB\") does; set data.preprocess.color to say so and silence this",
                    role.field(),
                    grey.path.display()
                ));
            }
        }
    }
    let image_size =
        (!opened.folders.is_empty()).then(|| image::fixed_size(&parsed.spec.data.preprocess).or(model_size)).flatten();
    Ok(Sweep {
        spec_file: parsed.file.clone(),
        spec: parsed.spec,
        model_path,
        data_dir,
        base_dir: base,
        color,
        image_size,
        model_input: input_name,
        sample_rank: input_rank.saturating_sub(1),
        evaluation_labelled,
        notes,
        runs,
    })
}

/// What the roles' sources hold, opened once for every check.
struct OpenedSources {
    /// (height, width) of the IDX dataset's images, if a role reads it.
    dataset_shape: Option<(usize, usize)>,
    folders: Vec<(Role, ImageFolder)>,
    tensors: Vec<(Role, TensorSet)>,
}

impl OpenedSources {
    /// How many samples `role`'s `source` holds (none if it could not be
    /// opened), and whether they have labels.
    fn population(&self, role: Role, source: &Source, data_dir: &Path) -> (Option<usize>, bool) {
        match source {
            Source::Idx { dataset, split, .. } => (data::split_count(*dataset, data_dir, *split).ok(), true),
            Source::ImageFolder { .. } => {
                (self.folders.iter().find(|(r, _)| *r == role).map(|(_, f)| f.samples.len()), true)
            }
            Source::Tensors { .. } => self
                .tensors
                .iter()
                .find(|(r, _)| *r == role)
                .map_or((None, true), |(_, set)| (Some(set.len()), set.labels.is_some())),
        }
    }
}

/// Opens every role's source, reporting what cannot be read and labels a
/// role needs but its source lacks.
fn open_sources(
    parsed: &ParsedSpec,
    sources: &[(Role, Source)],
    data_dir: &Path,
    errors: &mut Vec<Diagnostic>,
) -> OpenedSources {
    let dataset = parsed.spec.data.dataset;
    let mut opened = OpenedSources { dataset_shape: None, folders: Vec::new(), tensors: Vec::new() };
    let idx_splits: Vec<Split> = sources
        .iter()
        .filter_map(|(_, source)| match source {
            Source::Idx { split, .. } => Some(*split),
            _ => None,
        })
        .collect();
    if idx_splits.contains(&Split::Test) {
        match data::split_image_size(dataset, data_dir, Split::Test) {
            Ok(size) => opened.dataset_shape = Some(size),
            Err(e) => errors.push(parsed.diagnostic(JsonPath::parse("data"), e.to_string(), e.fix(dataset))),
        }
    }
    if idx_splits.contains(&Split::Train) {
        if let Err(e) = data::split_files(dataset, data_dir, Split::Train) {
            errors.push(parsed.diagnostic(JsonPath::parse("data"), e.to_string(), e.fix(dataset)));
        }
    }
    for (role, source) in sources {
        let at = JsonPath::parse("data").key(role.field());
        match source {
            Source::Idx { .. } => {}
            Source::ImageFolder { labels_file, .. } => match source.folder() {
                Ok(folder) => opened.folders.push((*role, folder)),
                Err(e) => errors.push(parsed.diagnostic(
                    at.key(if labels_file.is_some() { "labels_file" } else { "images" }),
                    e.to_string(),
                    "point it at a folder with one subfolder of images per class, or give a labels_file (paths are relative to the spec file)",
                )),
            },
            Source::Tensors { .. } => match source.tensors() {
                Ok(set) => {
                    if set.labels.is_none() && *role == Role::Training {
                        errors.push(parsed.diagnostic(
                            at.key("tensors"),
                            format!("{} holds no labels, which {} needs", set.path.display(), role.field()),
                            "save labels with the inputs (a `labels` entry, or (input, label) pairs), or set label_key",
                        ));
                    }
                    opened.tensors.push((*role, set));
                }
                Err(e) => errors.push(parsed.diagnostic(
                    at.key("tensors"),
                    e.to_string(),
                    "name a .npy, .npz or torch.save .pt file, or a folder of .pt files (paths are relative to the spec file)",
                )),
            },
        }
    }
    if opened.folders.is_empty() && !image_preprocessing(&parsed.spec.data.preprocess).is_empty() {
        errors.push(parsed.diagnostic(
            JsonPath::parse("data.preprocess"),
            format!(
                "{} apply to image folder sources only, and no role reads an image folder",
                image_preprocessing(&parsed.spec.data.preprocess).join(", "),
            ),
            "remove them, or name an image folder in data.evaluation, data.calibration or data.training",
        ));
    }
    let trains_itself = matches!(parsed.spec.model, ModelSource::Trained(_));
    if trains_itself
        && sources.iter().any(|(role, source)| *role == Role::Training && !matches!(source, Source::Idx { .. }))
    {
        errors.push(parsed.diagnostic(
            JsonPath::parse("data.training"),
            "`model.train` trains on the IDX dataset only so far",
            "remove data.training to train on the IDX dataset, or train the model elsewhere and name its ONNX file",
        ));
    }
    opened
}

/// The preprocessing fields given that only image sources use.
fn image_preprocessing(preprocess: &spec::Preprocess) -> Vec<&'static str> {
    let defaults = spec::Preprocess::default();
    [
        ("resize", preprocess.resize.is_some()),
        ("interpolation", preprocess.interpolation != defaults.interpolation),
        ("antialias", preprocess.antialias != defaults.antialias),
        ("center_crop", preprocess.center_crop.is_some()),
        ("color", preprocess.color.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect()
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
    for (field, size) in [("resize", preprocess.resize), ("center_crop", preprocess.center_crop)] {
        if size.is_some_and(|size| size.square_or_pair().contains(&0)) {
            errors.push(parsed.diagnostic(
                JsonPath::parse("data.preprocess").key(field),
                format!("{field} has a side of 0 pixels"),
                "give sizes of at least 1 pixel: an int, or [height, width]",
            ));
        }
    }
    for role in Role::ALL {
        let Some(source) = spec.data.source(role) else { continue };
        let at = JsonPath::parse("data").key(role.field());
        let mut refuse = |field: &str, problem: String, fix: &str| {
            errors.push(parsed.diagnostic(if field.is_empty() { at.clone() } else { at.key(field) }, problem, fix))
        };
        match (&source.images, &source.tensors) {
            (None, None) => refuse(
                "",
                format!("data.{} names neither `images` nor `tensors`", role.field()),
                "add \"images\": a folder of images, or \"tensors\": a .npy, .npz or .pt file",
            ),
            (Some(_), Some(_)) => refuse(
                "tensors",
                format!("data.{} names both `images` and `tensors`", role.field()),
                "keep one: a source is an image folder or a tensor file",
            ),
            (Some(_), None) => {
                for (field, given) in
                    [("input_key", source.input_key.is_some()), ("label_key", source.label_key.is_some())]
                {
                    if given {
                        refuse(
                            field,
                            format!("`{field}` applies to tensor files only"),
                            "remove it, or name the tensor file in `tensors`",
                        );
                    }
                }
            }
            (None, Some(_)) => {
                for (field, given) in
                    [("labels_file", source.labels_file.is_some()), ("classes", source.classes.is_some())]
                {
                    if given {
                        refuse(
                            field,
                            format!("`{field}` applies to image folders only"),
                            "remove it, or name the folder in `images`",
                        );
                    }
                }
            }
        }
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

/// Where `float_layers` a run has comes from in the spec, for errors.
fn float_layers_path(run: &Run) -> JsonPath {
    match run.origin {
        matrix::Origin::Include(index) => JsonPath::parse("include").index(index).key("float_layers"),
        _ => JsonPath::parse("matrix.float_layers"),
    }
}

/// `float_layers` and sensitivity: a budget for "auto", no more ops in
/// float than a recipe quantizes, fp16 only where the format has Casts,
/// and a validation subset that its source can hold after the calibration
/// set is taken out, with labels for a budget and none of the test images.
fn check_float_layers(
    parsed: &ParsedSpec,
    runs: &[Run],
    model: Option<&onnx::Model>,
    (sources, opened, data_dir): (&[(Role, Source)], &OpenedSources, &Path),
    errors: &mut Vec<Diagnostic>,
) {
    let spec = &parsed.spec;
    let settings = spec.sensitivity_settings();
    let recipes: Vec<(&Run, &matrix::Recipe)> =
        runs.iter().filter_map(|r| r.recipe().map(|recipe| (r, recipe))).collect();
    let with_float: Vec<&(&Run, &matrix::Recipe)> = recipes.iter().filter(|(_, r)| !r.float_layers.is_none()).collect();
    if spec.sensitivity.is_none() && with_float.is_empty() {
        return;
    }
    let section = JsonPath::parse("sensitivity");
    if let Some((run, _)) = with_float.iter().find(|(_, r)| r.float_layers == spec::FloatLayers::AUTO) {
        if settings.accuracy_budget.is_none() {
            errors.push(parsed.diagnostic(
                float_layers_path(run),
                format!("run {} has float_layers \"auto\", which needs an accuracy budget, but sensitivity.accuracy_budget is not set", run.id),
                "add \"sensitivity\": {\"accuracy_budget\": 0.3} (points of validation top-1 below fp32 that are accepted), or use a count of layers",
            ));
        }
    }
    if settings.fallback_precision == spec::FallbackPrecision::Fp16
        && spec.int8_format() == spec::Int8Format::OnnxruntimeCpu
    {
        errors.push(parsed.diagnostic(
            section.key("fallback_precision"),
            "fallback_precision fp16 applies to the tensorrt format, but this sweep writes onnxruntime-cpu models, whose float ops run in fp32",
            "remove fallback_precision, or set \"int8_format\": \"tensorrt\"",
        ));
    }
    if settings.samples > settings.validation_samples {
        errors.push(parsed.diagnostic(
            section.key("samples"),
            format!(
                "sensitivity scores {} images, the first of the validation subset, which holds only {}",
                settings.samples, settings.validation_samples
            ),
            "lower sensitivity.samples, or raise sensitivity.validation_samples",
        ));
    }
    if let Some(model) = model {
        let graph = model.proto.graph.as_ref().expect("a loaded model has a graph");
        for (run, recipe) in &with_float {
            let spec::FloatLayers::Count(k) = recipe.float_layers else { continue };
            let quantized = qdq::quantized_ops(graph, spec.int8_format(), recipe.residual_fusion).len();
            if k as usize > quantized {
                errors.push(parsed.diagnostic(
                    float_layers_path(run),
                    format!("run {} leaves {k} ops in float, but its recipe quantizes only {quantized}", run.id),
                    format!("use a count of at most {quantized} (or \"auto\")"),
                ));
            }
        }
    }
    // The validation subset: the calibration source, less the calibration set.
    let Some((_, source)) = sources.iter().find(|(role, _)| *role == Role::Calibration) else { return };
    if sources.iter().any(|(role, other)| *role == Role::Evaluation && other.shares_images_with(source)) {
        errors.push(parsed.diagnostic(
            JsonPath::parse("data.calibration"),
            "the validation subset that sensitivity and float_layers use is drawn from data.calibration, which is also the evaluation source, so the budget would be judged on test images",
            "calibrate from a training or held-out folder, not the evaluation one",
        ));
        return;
    }
    let (population, labelled) = opened.population(Role::Calibration, source, data_dir);
    if !labelled && with_float.iter().any(|(_, r)| r.float_layers == spec::FloatLayers::AUTO) {
        errors.push(parsed.diagnostic(
            JsonPath::parse("data.calibration.tensors"),
            "float_layers \"auto\" judges its budget on validation top-1, drawn from data.calibration, whose samples have no labels",
            "save labels with the calibration tensors, or use a count of layers",
        ));
    }
    let Some(population) = population else { return };
    let calibration = source
        .subset(Some((spec.calibration.samples, spec.calibration.seed)))
        .map_or(population, |(n, _)| (n as usize).min(population));
    let left = population - calibration;
    if settings.validation_samples as usize > left {
        errors.push(parsed.diagnostic(
            section.key("validation_samples"),
            format!(
                "the validation subset is {} samples, but data.calibration's source holds {population}, and {calibration} of them are the calibration set, which validation leaves out: {left} remain",
                settings.validation_samples
            ),
            format!("use at most {left} validation samples, or calibrate on fewer"),
        ));
    }
}

/// The QAT section, where a run fine-tunes: augmentations that keep the
/// image's size and are well formed, and a validation subset that the
/// training source can hold beside the calibration and fine-tuning
/// subsets, and that is not the evaluation source.
fn check_qat(
    parsed: &ParsedSpec,
    runs: &[Run],
    (sources, opened, data_dir): (&[(Role, Source)], &OpenedSources, &Path),
    errors: &mut Vec<Diagnostic>,
) {
    let spec = &parsed.spec;
    let section = JsonPath::parse("qat");
    for (index, transform) in spec.qat.augment.iter().enumerate() {
        let at = section.key("augment").index(index);
        match transform {
            spec::Augmentation::RandomResizedCrop { scale, ratio } => {
                let ranges = [
                    (
                        "scale",
                        scale,
                        scale.iter().all(|s| *s > 0.0 && *s <= 1.0),
                        "area shares within (0, 1]",
                        "0 < low <= high <= 1",
                        "[0.08, 1.0]",
                    ),
                    (
                        "ratio",
                        ratio,
                        ratio.iter().all(|r| *r > 0.0 && r.is_finite()),
                        "aspect ratios above 0",
                        "0 < low <= high",
                        "[0.75, 1.3333]",
                    ),
                ];
                for (field, range, within, what, bounds, example) in ranges {
                    if !within || range[0] > range[1] {
                        errors.push(
                            parsed
                                .diagnostic(
                                    at.key("random_resized_crop").key(field),
                                    format!("{field} [{}, {}] is not a range of {what}", range[0], range[1]),
                                    format!("give [low, high] with {bounds}, e.g. torchvision's {example}"),
                                )
                                .expected(format!("[low, high] with {bounds}")),
                        );
                    }
                }
            }
            spec::Augmentation::Pad(_) if spec.qat.augment.get(index + 1) != Some(&spec::Augmentation::RandomCrop) => {
                errors.push(parsed.diagnostic(
                    at,
                    "pad grows the image, which the model's fixed input size cannot take, and no random_crop follows it",
                    "follow it with \"random_crop\", as torchvision's Pad then RandomCrop(size)",
                ));
            }
            spec::Augmentation::RandomCrop
                if index == 0 || !matches!(spec.qat.augment[index - 1], spec::Augmentation::Pad(_)) =>
            {
                errors.push(parsed.diagnostic(
                    at,
                    "random_crop crops back to the image's size, so without a pad just before it it does nothing",
                    "put {\"pad\": 4} before it (torchvision's RandomCrop(size, padding=4)), or remove it",
                ));
            }
            _ => {}
        }
    }
    if !runs.iter().any(|r| r.recipe().is_some_and(|recipe| recipe.qat_epochs > 0)) {
        return;
    }
    let source_of = |role: Role| sources.iter().find(|(r, _)| *r == role).map(|(_, s)| s);
    let (Some(training), Some(calibration)) = (source_of(Role::Training), source_of(Role::Calibration)) else { return };
    if source_of(Role::Evaluation).is_some_and(|evaluation| evaluation.shares_images_with(training)) {
        errors.push(parsed.diagnostic(
            JsonPath::parse("data.training"),
            "QAT's validation subset is drawn from data.training, which reads the evaluation source's images, so the epoch kept would be chosen on test images",
            "fine-tune from a training folder or file, not the evaluation one",
        ));
        return;
    }
    if !calibration.listed_alike(training) && calibration.shares_images_with(training) {
        errors.push(parsed.diagnostic(
            JsonPath::parse("data.calibration"),
            "data.calibration and data.training read the same folder but list it differently (their classes or labels files differ), so QAT's validation subset, drawn from data.training, cannot be kept apart from the calibration set",
            "give both sections the same classes, or calibrate from other files",
        ));
        return;
    }
    let (Some(population), _) = opened.population(Role::Training, training, data_dir) else { return };
    let held_out = crate::plan::qat_held_out(spec, calibration, training);
    let draws: Vec<(u32, u64)> = held_out.iter().map(|d| (d.samples, d.seed)).collect();
    let left = crate::data::source::subset_indices(population, None, &draws).len();
    let wanted = spec.qat.validation_samples as usize;
    if wanted > left {
        let count = |d: &crate::plan::HeldOutDraw| (d.samples as usize).min(population);
        let parts: Vec<String> =
            held_out.iter().map(|d| format!("the {} {} samples ({})", count(d), d.what, d.field)).collect();
        let calibration_count = held_out.iter().find(|d| d.what == "calibration").map_or(0, count);
        let fine_tuning_field = held_out.iter().find(|d| d.what == "fine-tuning").map_or("qat.samples", |d| d.field);
        let beyond_calibration = population - calibration_count;
        let fix = if beyond_calibration < 10 {
            format!(
                "the calibration set takes all but {beyond_calibration} of data.training's images: fine-tune from a larger source, or calibrate on fewer"
            )
        } else if left > 0 {
            format!("use at most {left} validation samples (qat.validation_samples), or fine-tune on fewer ({fine_tuning_field})")
        } else if beyond_calibration > wanted {
            format!(
                "fine-tune on fewer: {fine_tuning_field} of at most {} leaves {wanted} for validation",
                beyond_calibration - wanted
            )
        } else {
            format!(
                "the source has {beyond_calibration} images beyond the calibration set: split them, e.g. {fine_tuning_field} {} and qat.validation_samples {}, or fine-tune from a larger source",
                beyond_calibration - beyond_calibration / 5,
                beyond_calibration / 5
            )
        };
        errors.push(parsed.diagnostic(
            section.key("validation_samples"),
            format!(
                "the validation subset is {wanted} samples, but data.training holds {population}, and once {} are held out only {left} remain",
                parts.join(" and ")
            ),
            fix,
        ));
    }
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

/// The model must take one float image batch that every data source can
/// feed (channels and size after preprocessing), and score as many classes
/// as the sources have. Returns the colour mode its channels imply and
/// the image size it fixes.
fn check_model(
    parsed: &ParsedSpec,
    model: &onnx::Model,
    opened: &OpenedSources,
    errors: &mut Vec<Diagnostic>,
) -> Option<ModelFacts> {
    let OpenedSources { dataset_shape, folders, tensors } = opened;
    let dataset_shape = *dataset_shape;
    let path = JsonPath::parse("model");
    let mut fail = |problem: String, fix: &str| errors.push(parsed.diagnostic(path.clone(), problem, fix));
    let inputs = model.inputs();
    let [input] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        fail(
            format!(
                "the model has {} runtime inputs ({}); qsweep feeds exactly one image tensor",
                inputs.len(),
                names.join(", ")
            ),
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
    let preprocess = &parsed.spec.data.preprocess;
    let Some([_, a, b, c]) = input.shape.as_deref() else {
        fail(
            format!("input `{}` has shape {}, not an image batch of 4 dimensions", input.name, input.shape_text()),
            "export the model with an input of [batch, channels, height, width]",
        );
        return None;
    };
    let (channels, height, width) = match preprocess.layout {
        Layout::Nchw => (a, b, c),
        Layout::Nhwc => (c, a, b),
    };
    let fixed = |dim: &Dim| match dim {
        Dim::Fixed(n) => Some(*n as u32),
        Dim::Dynamic(_) => None,
    };
    let model_color = match fixed(channels) {
        Some(1) => Some(Color::Grey),
        Some(3) | None => Some(Color::Rgb),
        Some(other) => {
            fail(
                format!("input `{}` has {other} channels; qsweep feeds grey (1) or colour (3) images", input.name),
                "export the model for 1- or 3-channel images, or set data.preprocess.layout if its channels come last",
            );
            None
        }
    };
    let color = preprocess.color.or(model_color)?;
    let feeds = image::channels(color) as u32;
    let model_size = fixed(height).zip(fixed(width)).map(|(h, w)| [h, w]);
    if let Some(model_channels) = fixed(channels).filter(|&c| c != feeds) {
        errors.push(parsed.diagnostic(
            JsonPath::parse("data.preprocess.color"),
            format!("color {color:?} gives {feeds} channel(s), but input `{}` takes {model_channels}", input.name),
            "set data.preprocess.color to match the model: grey for 1 channel, rgb or bgr for 3",
        ));
    }
    for (field, values) in [("mean", &preprocess.mean), ("std", &preprocess.std)] {
        if values.len() != 1 && values.len() as u32 != feeds {
            errors.push(parsed.diagnostic(
                JsonPath::parse("data.preprocess").key(field),
                format!("{field} has {} values, but the images have {feeds} channel(s)", values.len()),
                "give one value per channel, or a single value for all",
            ));
        }
    }
    // What each kind of source feeds: the IDX dataset its grey 28x28
    // images, folders the size their preprocessing fixes.
    let mut fed: Vec<(String, u32, Option<[u32; 2]>)> = Vec::new();
    if let Some((h, w)) = dataset_shape {
        fed.push((format!("{} images", parsed.spec.data.dataset.name()), 1, Some([h as u32, w as u32])));
    }
    if !folders.is_empty() {
        // Without a crop or exact resize, each image must already be the
        // model's size (prepare-data checks every one).
        let size = image::fixed_size(preprocess).or(model_size);
        if size.is_none() {
            errors.push(parsed.diagnostic(
                JsonPath::parse("data.preprocess"),
                "the model takes images of any size, and nothing in data.preprocess makes the folder's images one size",
                "add center_crop (e.g. 224, after \"resize\": 256, as torchvision's ImageNet preprocessing does) or an exact resize [h, w]",
            ));
        }
        fed.push(("the preprocessed folder images".to_string(), feeds, size));
    }
    for (what, fed_channels, size) in fed {
        let size_ok = |dim: &Dim, fed: u32| fixed(dim).is_none_or(|d| d == fed);
        let fits = fixed(channels).is_none_or(|c| c == fed_channels)
            && size.is_none_or(|[h, w]| size_ok(height, h) && size_ok(width, w));
        if !fits {
            let fed_shape = match size {
                Some([h, w]) => format!("[batch, {fed_channels}, {h}, {w}]"),
                None => format!("[batch, {fed_channels}, ?, ?]"),
            };
            errors.push(parsed.diagnostic(
                JsonPath::parse("model"),
                format!("input `{}` has shape {}, but {what} are {fed_shape}", input.name, input.shape_text()),
                "use a model made for this data, or change data.preprocess (resize, center_crop, color) to what the model takes",
            ));
        }
    }
    // Tensor files hold inputs as the model takes them, in its layout.
    for (role, set) in tensors {
        let fits = input.shape.as_deref().is_some_and(|shape| {
            shape.len() == set.sample_shape.len() + 1
                && shape[1..].iter().zip(&set.sample_shape).all(|(dim, &n)| fixed(dim).is_none_or(|d| d as usize == n))
        });
        if !fits {
            errors.push(parsed.diagnostic(
                JsonPath::parse("data").key(role.field()).key("tensors"),
                format!(
                    "{} holds samples of shape {:?}, but input `{}` takes {}",
                    set.path.display(),
                    set.sample_shape,
                    input.name,
                    input.shape_text()
                ),
                "save the inputs preprocessed to the model's input shape (batch first), or use a model made for them",
            ));
        }
        if set.dtypes.contains(&crate::data::tensor_source::Dtype::U8) {
            let channels = set.sample_shape.get(preprocess.layout.channel_axis(set.sample_shape.len())).copied();
            for (field, values) in [("mean", &preprocess.mean), ("std", &preprocess.std)] {
                if values.len() != 1 && Some(values.len()) != channels {
                    errors.push(parsed.diagnostic(
                        JsonPath::parse("data.preprocess").key(field),
                        format!(
                            "{field} has {} values, but the uint8 inputs of {} have {} channel(s)",
                            values.len(),
                            set.path.display(),
                            channels.unwrap_or(0)
                        ),
                        "give one value per channel, or a single value for all",
                    ));
                }
            }
        }
    }
    let mut batch_one_only = None;
    if let Some(Some(Dim::Fixed(fixed))) = input.shape.as_ref().map(|s| s.first().cloned()) {
        let fixed = fixed as u32;
        if fixed == 1 {
            // Freed by the stages where the graph allows; else batch 1 only.
            batch_one_only = crate::onnx::batch::fixed_at_one(&model.proto);
        } else if parsed.spec.evaluate.batch_sizes.iter().any(|&b| b != fixed) {
            errors.push(parsed.diagnostic(
                JsonPath::parse("evaluate.batch_sizes"),
                format!("the model's batch axis is fixed at {fixed}, so it cannot run other batch sizes"),
                format!("set evaluate.batch_sizes to [{fixed}], or re-export the model with a dynamic batch axis"),
            ));
        }
    }
    let outputs = model.outputs();
    let chosen = match &parsed.spec.evaluate.output {
        Some(name) => outputs.iter().find(|o| &o.name == name).or_else(|| {
            let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
            errors.push(parsed.diagnostic(
                JsonPath::parse("evaluate.output"),
                format!("the model has no output `{name}`; its outputs are: {}", names.join(", ")),
                "name the output that holds the class scores",
            ));
            None
        }),
        None => outputs.first(),
    };
    let scored = chosen.and_then(|o| o.shape.as_ref().map(|s| s.last().cloned()));
    if let Some(Some(Dim::Fixed(classes))) = scored {
        if dataset_shape.is_some() && classes != 10 {
            errors.push(parsed.diagnostic(
                JsonPath::parse("model"),
                format!("the model scores {classes} classes, but {} has 10", parsed.spec.data.dataset.name()),
                "use a model with a 10-class head, or name image folders for every role",
            ));
        }
        // (role, lowest and highest label, how the source is named)
        let labelled = folders
            .iter()
            .map(|(role, folder)| {
                let labels = folder.samples.iter().map(|s| i64::from(s.label));
                (role, labels.clone().min().zip(labels.max()), folder_source(folder))
            })
            .chain(tensors.iter().map(|(role, set)| {
                let labels = set.labels.iter().flatten().copied();
                (role, labels.clone().min().zip(labels.max()), set.path.display().to_string())
            }));
        for (role, range, source) in labelled {
            let Some((lowest, highest)) = range else { continue };
            if highest >= classes {
                errors.push(parsed.diagnostic(
                    JsonPath::parse("data").key(role.field()),
                    format!(
                        "{source} has label {highest}, but the model scores only {classes} classes (0 to {})",
                        classes - 1
                    ),
                    "fix the labels, or use the model the labels were made for",
                ));
            }
            if lowest < 0 {
                errors.push(parsed.diagnostic(
                    JsonPath::parse("data").key(role.field()),
                    format!("{source} has a negative label ({lowest})"),
                    "labels are class indices from 0",
                ));
            }
        }
        for (role, folder) in folders.iter().filter(|(_, folder)| !folder.classes.is_empty()) {
            if folder.classes.len() as i64 != classes {
                errors.push(parsed.diagnostic(
                    JsonPath::parse("data").key(role.field()),
                    format!(
                        "the model scores {classes} classes, but {} has {} class(es) ({})",
                        folder.root.display(),
                        folder.classes.len(),
                        preview(&folder.classes)
                    ),
                    format!(
                        "give data.{}.classes: all {classes} class names in the model's index order, so each folder's label is its position",
                        role.field()
                    ),
                ));
            }
        }
    }
    Some(ModelFacts { color: Some(color), size: model_size, batch_one_only })
}

/// What validation learned from the model's graph.
struct ModelFacts {
    /// The colour mode its channels imply.
    color: Option<Color>,
    /// The image size its input fixes.
    size: Option<[u32; 2]>,
    /// Why the graph runs batch 1 only, if it does.
    batch_one_only: Option<String>,
}

/// How a folder source is named in messages.
fn folder_source(folder: &ImageFolder) -> String {
    match &folder.labels_file {
        Some(file) => file.display().to_string(),
        None => folder.root.display().to_string(),
    }
}

/// The first few names of a list, for messages.
pub(crate) fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    if names.len() > shown.len() {
        format!("{}, ...", shown.join(", "))
    } else {
        shown.join(", ")
    }
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
        for source in
            [&mut spec.data.evaluation, &mut spec.data.calibration, &mut spec.data.training].into_iter().flatten()
        {
            for path in [&mut source.images, &mut source.labels_file, &mut source.tensors].into_iter().flatten() {
                *path = std::path::absolute(self.base_dir.join(&*path))?.display().to_string();
            }
        }
        Ok(serde_json::to_string(&spec).expect("a spec serializes"))
    }

    /// The results directory used when `--results` is not given.
    pub fn default_results_dir(&self) -> PathBuf {
        PathBuf::from("results").join(&self.spec.name)
    }

    /// Content fingerprints of the model and the dataset files.
    pub fn sources(&self) -> std::io::Result<Sources> {
        let model_digest = match &self.spec.model {
            ModelSource::File(_) => crate::files::hash_file(&self.model_path)?.1,
            // What the training stage is asked for stands for what it writes.
            ModelSource::Trained(trained) => {
                let text = serde_json::to_string(trained).expect("a spec serializes");
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()))
            }
        };
        let record = |role| -> std::io::Result<SourceRecord> {
            let source = Source::of(
                role,
                &self.spec.data,
                &self.data_dir,
                &self.base_dir,
                (&self.model_input, self.sample_rank),
            );
            Ok(SourceRecord { digest: source_digest(&source)?, source: source.absolute()? })
        };
        Ok(Sources {
            model_digest,
            evaluation: record(Role::Evaluation)?,
            calibration: record(Role::Calibration)?,
            training: record(Role::Training)?,
            color: self.color,
            image_size: self.image_size,
            evaluation_labelled: self.evaluation_labelled,
        })
    }
}

/// A fingerprint of what a source holds: the IDX split's file contents, or
/// an image folder's or tensor source's files with sizes and times.
fn source_digest(source: &Source) -> std::io::Result<String> {
    match source {
        Source::Idx { dataset, dir, split } => {
            let (images, labels) = data::split_files(*dataset, dir, *split).map_err(std::io::Error::other)?;
            let mut digest = String::new();
            for file in [images, labels] {
                digest.push_str(&crate::files::hash_file(&file)?.1[..16]);
            }
            Ok(digest)
        }
        Source::ImageFolder { .. } => {
            let folder = source.folder().map_err(std::io::Error::other)?;
            folder.fingerprint().map_err(std::io::Error::other)
        }
        Source::Tensors { .. } => {
            let set = source.tensors().map_err(std::io::Error::other)?;
            set.fingerprint().map_err(std::io::Error::other)
        }
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
