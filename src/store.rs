//! The results directory: artifacts stored by content key, failure records,
//! and the plan that ties them to runs.
//!
//! Completion is atomic. A stage writes into a private staging directory;
//! `Staging::commit` hashes every file into a manifest, fsyncs, and renames
//! the directory to its key. A crash before the rename leaves only a staging
//! directory, which never counts as done; a crash after it leaves a complete
//! artifact. A rerun trusts an artifact only if its manifest verifies.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::plan::{Plan, StageKind, TaskKey};

const MANIFEST: &str = "manifest.json";
const STAGING_PREFIX: &str = ".staging-";

/// One file of an artifact, as recorded when it was completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What a completed artifact holds, and what its stage measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub key: TaskKey,
    pub stage: StageKind,
    pub files: Vec<FileEntry>,
    pub metrics: Value,
    pub elapsed_s: f64,
    pub completed_unix: u64,
}

/// The last error of a task that used up its retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub key: TaskKey,
    pub stage: StageKind,
    pub attempts: u32,
    pub error: String,
    pub failed_unix: u64,
}

/// A results directory: `plan.json`, `artifacts/<key>/`, `failures/<key>.json`.
#[derive(Debug, Clone)]
pub struct ResultsDir {
    root: PathBuf,
}

impl ResultsDir {
    /// Opens (creating if needed) a results directory, failing early if it
    /// cannot be written, before any work is spent.
    pub fn create(root: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(root.join("artifacts"))?;
        fs::create_dir_all(root.join("failures"))?;
        let probe = root.join(format!(".write-probe-{}", std::process::id()));
        fs::write(&probe, b"")?;
        fs::remove_file(&probe)?;
        Ok(Self { root: root.to_path_buf() })
    }

    /// Opens an existing results directory for reading.
    pub fn open(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn artifact_dir(&self, key: &TaskKey) -> PathBuf {
        self.root.join("artifacts").join(&key.0)
    }

    /// The manifest of a complete artifact whose files all verify.
    pub fn verified(&self, key: &TaskKey) -> Option<Manifest> {
        let dir = self.artifact_dir(key);
        let manifest: Manifest = serde_json::from_slice(&fs::read(dir.join(MANIFEST)).ok()?).ok()?;
        if &manifest.key != key {
            return None;
        }
        let intact = manifest.files.iter().all(|entry| {
            hash_file(&dir.join(&entry.name)).is_ok_and(|(bytes, sha)| bytes == entry.bytes && sha == entry.sha256)
        });
        intact.then_some(manifest)
    }

    /// The manifest of an artifact without re-hashing its files; for reports,
    /// which must stay fast on large sweeps and only read metrics. Falls
    /// back to manifests fetched from an object store without their files.
    pub fn manifest(&self, key: &TaskKey) -> Option<Manifest> {
        let local =
            fs::read(self.artifact_dir(key).join(MANIFEST)).or_else(|_| fs::read(self.remote_manifest_path(key)));
        serde_json::from_slice(&local.ok()?).ok()
    }

    /// Where a manifest fetched from an object store, without its files,
    /// is kept for the reports.
    pub fn remote_manifest_path(&self, key: &TaskKey) -> PathBuf {
        self.root.join("remote-manifests").join(format!("{}.json", key.0))
    }

    /// Starts writing the artifact of `key` in a private staging directory.
    pub fn begin(&self, key: &TaskKey, stage: StageKind) -> std::io::Result<Staging> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{STAGING_PREFIX}{}-{}-{}",
            key.short(),
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.root.join("artifacts").join(name);
        fs::create_dir_all(&dir)?;
        Ok(Staging { dir, key: key.clone(), stage, target: self.artifact_dir(key), committed: false })
    }

    /// Removes staging directories left by a process that died mid-stage.
    /// Only for a single coordinator that owns the directory.
    pub fn remove_abandoned_staging(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join("artifacts"))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(STAGING_PREFIX) {
                fs::remove_dir_all(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn record_failure(&self, record: &FailureRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        write_atomically(&self.failure_path(&record.key), &bytes)
    }

    pub fn failure(&self, key: &TaskKey) -> Option<FailureRecord> {
        serde_json::from_slice(&fs::read(self.failure_path(key)).ok()?).ok()
    }

    /// Forgets an old failure once the task has succeeded.
    pub fn clear_failure(&self, key: &TaskKey) -> std::io::Result<()> {
        match fs::remove_file(self.failure_path(key)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn failure_path(&self, key: &TaskKey) -> PathBuf {
        self.root.join("failures").join(format!("{}.json", key.0))
    }

    pub fn save_plan(&self, plan: &Plan) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(plan).map_err(std::io::Error::other)?;
        write_atomically(&self.root.join("plan.json"), &bytes)
    }

    pub fn load_plan(&self) -> std::io::Result<Plan> {
        let path = self.root.join("plan.json");
        let mut plan: Plan = serde_json::from_slice(&fs::read(&path)?)
            .map_err(|e| std::io::Error::other(format!("{} is damaged: {e}", path.display())))?;
        plan.reindex();
        Ok(plan)
    }
}

/// An artifact being written. Dropping it uncommitted deletes it.
pub struct Staging {
    dir: PathBuf,
    key: TaskKey,
    stage: StageKind,
    target: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Seals files copied from elsewhere under their original manifest,
    /// after checking that they are exactly what it lists.
    pub fn adopt(mut self, manifest: &Manifest) -> std::io::Result<()> {
        for entry in &manifest.files {
            let (bytes, sha256) = hash_file(&self.dir.join(&entry.name))?;
            if bytes != entry.bytes || sha256 != entry.sha256 {
                return Err(std::io::Error::other(format!("{} does not match its manifest", entry.name)));
            }
        }
        let bytes = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
        write_atomically(&self.dir.join(MANIFEST), &bytes)?;
        match fs::rename(&self.dir, &self.target) {
            Ok(()) => {}
            Err(_) if self.target.join(MANIFEST).exists() => fs::remove_dir_all(&self.dir)?,
            Err(e) => return Err(e),
        }
        self.committed = true;
        Ok(())
    }

    /// Seals the artifact: hashes its files, writes the manifest, and makes
    /// it visible under its key in one rename. If another worker completed
    /// the same key first, theirs is kept; the outputs are equivalent.
    pub fn commit(mut self, metrics: Value, elapsed_s: f64) -> std::io::Result<Manifest> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().expect("a directory entry has a name").to_string_lossy().to_string();
            let (bytes, sha256) = hash_file(&path)?;
            fs::File::open(&path)?.sync_all()?;
            files.push(FileEntry { name, bytes, sha256 });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let manifest = Manifest {
            key: self.key.clone(),
            stage: self.stage,
            files,
            metrics,
            elapsed_s,
            completed_unix: unix_now(),
        };
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
        let mut file = fs::File::create(self.dir.join(MANIFEST))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        match fs::rename(&self.dir, &self.target) {
            Ok(()) => {}
            Err(_) if self.target.join(MANIFEST).exists() => fs::remove_dir_all(&self.dir)?,
            Err(e) => return Err(e),
        }
        sync_dir(self.target.parent().expect("artifacts live in a directory"));
        self.committed = true;
        Ok(manifest)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes a file so that readers see either the old or the new content.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let temp = parent.join(format!(
        ".{}.tmp-{}",
        path.file_name().map_or("file".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let mut file = fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    sync_dir(parent);
    Ok(())
}

/// Makes a rename durable; best effort, as not every filesystem allows it.
fn sync_dir(dir: &Path) {
    if let Ok(handle) = fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// Size and hex SHA-256 of a file.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher)?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> TaskKey {
        TaskKey(format!("{text:0>64}"))
    }

    #[test]
    fn only_committed_artifacts_count() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::create(dir.path()).unwrap();
        let k = key("a");
        let staging = results.begin(&k, StageKind::Build).unwrap();
        fs::write(staging.dir().join("model.onnx"), b"bytes").unwrap();
        assert!(results.verified(&k).is_none(), "a staging directory is not an artifact");
        let manifest = staging.commit(serde_json::json!({"size": 5}), 0.1).unwrap();
        assert_eq!(manifest.files[0].bytes, 5);
        assert_eq!(results.verified(&k).unwrap().metrics["size"], 5);
    }

    #[test]
    fn a_damaged_artifact_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::create(dir.path()).unwrap();
        let k = key("b");
        let staging = results.begin(&k, StageKind::Build).unwrap();
        fs::write(staging.dir().join("model.onnx"), b"bytes").unwrap();
        staging.commit(Value::Null, 0.0).unwrap();
        fs::write(results.artifact_dir(&k).join("model.onnx"), b"bytez").unwrap();
        assert!(results.verified(&k).is_none());
    }

    #[test]
    fn an_abandoned_stage_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::create(dir.path()).unwrap();
        let k = key("c");
        let staging = results.begin(&k, StageKind::Evaluate).unwrap();
        let staging_dir = staging.dir().to_path_buf();
        drop(staging);
        assert!(!staging_dir.exists());
        assert!(!results.artifact_dir(&k).exists());
    }
}
