//! `qsweep train`: an fp32 model trained on an IDX dataset and written to
//! a file, with a live bar (plain lines off a terminal), stoppable by
//! SIGINT, SIGTERM or SIGHUP and resumable from the last finished epoch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use super::baseline::{self, BaselineOptions, Start};
use super::fit::Recipe;
use super::TrainError;
use crate::shutdown::{Signal, Signals};
use crate::spec::{self, TrainSpec};

/// What `qsweep train` was asked for: the spec's `model.train` fields as
/// flags, and where the data and the model are.
pub struct Request<'a> {
    pub out: &'a Path,
    /// Start from this ONNX model instead of a fresh ResNet.
    pub from: Option<&'a Path>,
    pub spec: &'a TrainSpec,
    pub dataset: &'a str,
    pub data_dir: Option<PathBuf>,
    pub mean: f32,
    pub std: f32,
}

pub enum Outcome {
    /// The model is at the requested path; the line says how it did.
    Written(String),
    /// A stop signal ended training; the same command resumes from
    /// `checkpoint`.
    Stopped { signal: Signal, checkpoint: PathBuf },
}

/// Trains and writes the model; an error is a usage or set-up error (or
/// a training failure) with its fix, and nothing is written for it.
pub fn run(request: &Request<'_>) -> Result<Outcome, String> {
    let (spec, out) = (request.spec, request.out);
    let recipe = Recipe::of(spec);
    if request.std.is_nan() || request.std <= 0.0 {
        return Err("--std must be above 0".into());
    }
    let Ok(dataset) = serde_json::from_value::<spec::Dataset>(serde_json::json!(request.dataset)) else {
        return Err(format!(
            "--dataset {} is not a dataset qsweep reads\n  fix: use fashion-mnist or mnist",
            request.dataset
        ));
    };
    let start = match request.from {
        Some(path) => Start::Model(crate::onnx::Model::load(path).map_err(|e| e.to_string())?.proto),
        None => Start::ResNet { depth: spec.depth as usize, width: spec.width as usize },
    };
    if let Start::ResNet { depth, width } = start {
        let probe = super::resnet::Architecture { depth, width, channels: 1, height: 28, width_px: 28, classes: 10 };
        probe.check().map_err(|e| format!("{e}\n  fix: pick --depth 8, 20 or 32 and a --width such as 16"))?;
    }
    let Some(parent) = out.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }) else {
        return Err(format!("--out {} names no file", out.display()));
    };
    if !parent.is_dir() {
        return Err(format!(
            "cannot write {}: {} is not a directory\n  fix: create it first",
            out.display(),
            parent.display()
        ));
    }
    let checkpoint = parent.join(format!(".{}.checkpoint", out.file_name().unwrap_or_default().to_string_lossy()));
    let options = BaselineOptions {
        start,
        dataset,
        data_dir: request.data_dir.clone().unwrap_or_else(|| PathBuf::from(dataset.default_dir())),
        preprocess: spec::Preprocess {
            scale: 255.0,
            mean: vec![request.mean],
            std: vec![request.std],
            ..Default::default()
        },
        samples: spec.samples as usize,
        recipe: recipe.clone(),
        checkpoint: checkpoint.clone(),
    };

    let cancel = Arc::new(AtomicBool::new(false));
    let caught = Arc::new(OnceLock::new());
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
    let mut signals =
        tokio.block_on(async { Signals::install() }).map_err(|e| format!("cannot handle signals: {e}"))?;
    let (flag, signal) = (cancel.clone(), caught.clone());
    std::thread::spawn(move || {
        let _ = signal.set(tokio.block_on(signals.recv()));
        flag.store(true, Ordering::Relaxed);
    });
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} {bar:30.cyan/blue} {pos}/{len} steps  {msg}  [ETA {eta}]",
        )
        .expect("a valid template"),
    );
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let trained = baseline::train(&options, &cancel, |step| {
        bar.set_length(step.steps_per_epoch as u64);
        bar.set_position(step.step as u64);
        bar.set_prefix(format!("{}/{}", step.epoch, recipe.epochs));
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} img/s",
            step.loss, step.learning_rate, step.images_per_s
        ));
        if plain && step.step == step.steps_per_epoch {
            eprintln!("epoch {}/{}: loss {:.4}, {:.0} img/s", step.epoch, recipe.epochs, step.loss, step.images_per_s);
        }
    });
    bar.finish_and_clear();
    let trained = match trained {
        Ok(trained) => trained,
        Err(TrainError::Cancelled) => {
            let signal = caught.get().copied().unwrap_or(Signal::Interrupt);
            return Ok(Outcome::Stopped { signal, checkpoint });
        }
        Err(e) => return Err(e.to_string()),
    };
    let staged = out.with_extension("onnx.partial");
    std::fs::write(&staged, prost::Message::encode_to_vec(&trained.model))
        .and_then(|_| std::fs::rename(&staged, out))
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    let _ = std::fs::remove_dir_all(&checkpoint);
    Ok(Outcome::Written(format!(
        "wrote {}: top-1 {:.2}% on the {} test images; {:.0} img/s; epoch losses {:?}",
        out.display(),
        trained.test_accuracy * 100.0,
        dataset.name(),
        trained.outcome.images_per_s,
        trained.outcome.epoch_losses.iter().map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>()
    )))
}
