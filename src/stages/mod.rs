//! The stages a run is made of: parameters and input artifacts in,
//! an artifact directory and metrics out. A stage knows nothing of where it
//! runs; in-process slots and `qsweep worker` processes call `execute` alike.
//!
//! Each stage file declares `VERSION`. Bump it whenever a change to the
//! stage would change what it writes: the version is part of every content
//! key, so old artifacts then stop matching instead of being reused.

pub mod build;
pub mod calibrate;
pub mod evaluate;
pub mod fallback;
pub mod learning_rate;
pub mod prepare_data;
pub mod qat;
pub mod sensitivity;
pub mod train;

use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::data::prepared::{self, PreparedError, PreparedSet};
use crate::engine::EngineError;
use crate::plan::{StageKind, Task};
use crate::store::{Manifest, ResultsDir};
use crate::sweep::Sweep;

/// What a stage needs besides its task.
pub struct StageContext<'a> {
    pub sweep: &'a Sweep,
    pub results: &'a ResultsDir,
    /// Set on Ctrl-C or timeout; long loops check it between batches.
    pub cancel: &'a AtomicBool,
    /// Says how a long stage is getting on (the worker's progress line).
    pub report: &'a (dyn Fn(&str) + Sync),
}

/// Why a stage attempt failed, and whether trying again could help.
#[derive(Debug, Error)]
pub enum StageError {
    /// A failure that may pass on another attempt (I/O, a runtime hiccup).
    #[error("{0}")]
    Retryable(String),
    /// A failure that will repeat: bad inputs, a model the engine rejects.
    #[error("{0}")]
    Fatal(String),
    /// An input artifact failed its check as this stage read it. It has
    /// been set aside: the coordinator rebuilds it, then runs this again.
    #[error("{0}")]
    DamagedInput(String),
    #[error("interrupted")]
    Cancelled,
}

impl From<PreparedError> for StageError {
    fn from(e: PreparedError) -> Self {
        match e {
            PreparedError::Damaged { .. } => StageError::DamagedInput(e.to_string()),
            PreparedError::NoSpace { .. } => StageError::Fatal(e.to_string()),
            PreparedError::Io { .. } => StageError::Retryable(e.to_string()),
        }
    }
}

/// Writes one file of a stage's artifact, naming it if that fails.
/// A batch of prepared `what` images as the NCHW array sessions take.
pub(crate) fn nchw(batch: ndarray::ArrayD<f32>, what: &str) -> Result<ndarray::Array4<f32>, StageError> {
    batch
        .into_dimensionality::<ndarray::Ix4>()
        .map_err(|e| StageError::Fatal(format!("{what} images are not NCHW: {e}")))
}

/// A JSON file an artifact holds (`name` in `dir`), decoded.
pub(crate) fn read_json<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<T, StageError> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).map_err(io_at(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| StageError::Fatal(format!("{} is damaged: {e}", path.display())))
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    std::fs::write(path, bytes).map_err(|e| io_failed(path, e, Some(bytes.len() as u64)))
}

/// For `map_err`: an I/O error at `path`, named.
pub(crate) fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> StageError + '_ {
    move |e| io_failed(path, e, None)
}

/// An I/O error at `path` as a stage error that names it, retryable by
/// its kind: permissions and a read-only or full disk repeat on every
/// attempt until someone acts (a full disk says what the file needed and
/// what is free); anything else may pass on another attempt.
fn io_failed(path: &Path, error: std::io::Error, needed: Option<u64>) -> StageError {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {}
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
            return StageError::Fatal(format!(
                "{}: {error}\n  fix: let this user read and write it, or give `qsweep run` another --results directory",
                path.display()
            ))
        }
        _ => return StageError::Retryable(format!("{}: {error}", path.display())),
    }
    let dir = path.parent().unwrap_or(path);
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64);
    let needed = needed.map_or(String::new(), |n| format!("it needed {}, ", mib(n)));
    let free = crate::data::prepared::free_bytes(dir).map_or("unknown".into(), mib);
    StageError::Fatal(format!(
        "cannot write {}: the disk is full ({needed}{free} free in {})\n  fix: free space there, or give `qsweep run` a --results directory on a larger disk, then rerun",
        path.display(),
        dir.display()
    ))
}

impl From<EngineError> for StageError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Cancelled => StageError::Cancelled,
            EngineError::LibraryNotFound { .. } | EngineError::Load { .. } | EngineError::ProviderMissing { .. } => {
                StageError::Fatal(e.to_string())
            }
            EngineError::Ort { .. } => StageError::Retryable(e.to_string()),
            EngineError::LabelOutOfRange { .. } => StageError::Fatal(e.to_string()),
        }
    }
}

impl StageContext<'_> {
    /// The fp32 model `task` works on: the one its sweep trained, or the spec's file.
    pub fn model_path(&self, task: &Task) -> Result<PathBuf, StageError> {
        match task.input(crate::plan::FP32_MODEL) {
            Some(_) => Ok(self.input_dir(task, crate::plan::FP32_MODEL)?.join(train::MODEL)),
            None => Ok(self.sweep.model_path.clone()),
        }
    }

    /// The fp32 model `task` works on, with a batch axis fixed at 1 freed
    /// where the graph allows (`onnx::batch`), so every stage sees the
    /// same graph.
    pub fn load_model(&self, task: &Task) -> Result<crate::onnx::Model, StageError> {
        let mut model =
            crate::onnx::Model::load(&self.model_path(task)?).map_err(|e| StageError::Fatal(e.to_string()))?;
        if let Some(freed) = crate::onnx::batch::free_batch(&model.proto) {
            model.proto = freed;
        }
        Ok(model)
    }

    /// The artifact directory of the input playing `role`, its files
    /// checked against its manifest now that this stage is to read them
    /// (shards of prepared data are checked as they are read instead).
    pub fn input_dir(&self, task: &Task, role: &str) -> Result<PathBuf, StageError> {
        Ok(self.checked_input(task, role)?.0)
    }

    fn checked_input(&self, task: &Task, role: &str) -> Result<(PathBuf, Manifest), StageError> {
        let key =
            task.input(role).ok_or_else(|| StageError::Fatal(format!("{} task has no `{role}` input", task.stage)))?;
        let manifest = self.results.checked_input(key, prepared::checked_when_read).map_err(|damaged| {
            self.results.set_aside(key);
            StageError::DamagedInput(format!(
                "input `{role}` of {} ({}): {damaged}; it was set aside to be made again",
                task.stage,
                key.short()
            ))
        })?;
        Ok((self.results.artifact_dir(key), manifest))
    }

    /// The prepared data of the input playing `role`. An index, labels
    /// file or shard found damaged as it is read sets the artifact aside.
    pub fn prepared(&self, task: &Task, role: &str) -> Result<Arc<PreparedSet>, StageError> {
        let (dir, manifest) = self.checked_input(task, role)?;
        let set = PreparedSet::open(&dir, &manifest.files).map_err(|e| self.read_error(task, role, e))?;
        Ok(Arc::new(set))
    }

    /// Turns a read error of `role`'s prepared data into the stage's
    /// error, setting a damaged artifact aside so it is made again.
    pub fn read_error(&self, task: &Task, role: &str, error: PreparedError) -> StageError {
        if let (PreparedError::Damaged { .. }, Some(key)) = (&error, task.input(role)) {
            self.results.set_aside(key);
        }
        error.into()
    }
}

/// A training stage's steps, told to the worker's progress line.
pub fn report_steps<'a>(context: &'a StageContext<'_>, epochs: u32) -> impl FnMut(crate::train::fit::Step) + 'a {
    move |step| {
        if step.worth_reporting() {
            (context.report)(&step.describe(epochs));
        }
    }
}

/// Decodes a task's parameters into the stage's own type.
pub fn params<T: DeserializeOwned>(task: &Task) -> Result<T, StageError> {
    serde_json::from_value(task.params.clone())
        .map_err(|e| StageError::Fatal(format!("{} task has malformed parameters: {e}", task.stage)))
}

/// Runs one attempt of a task and seals its artifact.
pub fn execute(task: &Task, context: &StageContext<'_>) -> Result<Manifest, StageError> {
    if !task.stage.writes_artifact() {
        return Ok(Manifest::new(task.key.clone(), task.stage, Vec::new(), serde_json::Value::Null, 0.0));
    }
    // What the inputs are now is what this artifact will say it was made from.
    let inputs = context.results.input_digests(task).map_err(|e| StageError::Retryable(e.to_string()))?;
    let artifacts = context.results.root().join("artifacts");
    let staging = context.results.begin(&task.key, task.stage).map_err(io_at(&artifacts))?;
    let started = Instant::now();
    let metrics = match task.stage {
        StageKind::PrepareData => prepare_data::run(task, context, staging.dir())?,
        StageKind::Build => build::run(task, context, staging.dir())?,
        StageKind::Evaluate => evaluate::run(task, context, staging.dir())?,
        StageKind::Calibrate => calibrate::run(task, context, staging.dir())?,
        StageKind::LearningRate => learning_rate::run(task, context, staging.dir())?,
        StageKind::Qat => qat::run(task, context, staging.dir())?,
        StageKind::Sensitivity => sensitivity::run(task, context, staging.dir())?,
        StageKind::Fallback => fallback::run(task, context, staging.dir())?,
        StageKind::Train => train::run(task, context, staging.dir())?,
        StageKind::Noop => unreachable!("no-op tasks return above"),
    };
    let staged = staging.dir().to_path_buf();
    staging.commit(metrics, started.elapsed().as_secs_f64(), inputs).map_err(io_at(&staged))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's /dev/full answers every write with ENOSPC, as a full
    /// disk does: the error names the file, what it needed and what is free,
    /// and is not retried.
    #[test]
    fn a_full_disk_names_the_file_and_what_it_needed() {
        let error = write_file(Path::new("/dev/full"), &[0; 3 << 20]).unwrap_err();
        let StageError::Fatal(message) = error else { panic!("a full disk is retried: {error:?}") };
        assert!(message.starts_with("cannot write /dev/full: the disk is full (it needed 3.0 MiB, "), "{message}");
        assert!(message.contains("free in /dev") && message.contains("fix: free space there"), "{message}");
    }

    #[test]
    fn permissions_and_read_only_disks_are_not_retried() {
        use std::io::{Error, ErrorKind};
        for kind in [ErrorKind::PermissionDenied, ErrorKind::ReadOnlyFilesystem] {
            match io_failed(Path::new("/results/a/model.onnx"), Error::from(kind), None) {
                StageError::Fatal(message) => {
                    assert!(message.starts_with("/results/a/model.onnx: ") && message.contains("fix:"))
                }
                other => panic!("{kind:?} is retried: {other:?}"),
            }
        }
        let interrupted = io_failed(Path::new("/results/a"), Error::from(ErrorKind::Interrupted), None);
        assert!(matches!(interrupted, StageError::Retryable(_)), "{interrupted:?}");
    }

    #[test]
    fn other_io_errors_name_the_path_and_may_be_retried() {
        let missing = Path::new("/nonexistent-qsweep-dir/model.onnx");
        match write_file(missing, b"x").unwrap_err() {
            StageError::Retryable(message) => {
                assert!(message.starts_with("/nonexistent-qsweep-dir/model.onnx: "), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
