//! The results directory: artifacts stored by content key, failure records,
//! and the plan that ties them to runs.
//!
//! Completion is atomic. A stage writes into a private staging directory;
//! `Staging::commit` hashes every file into a manifest, fsyncs, and renames
//! the directory to its key. A crash before the rename leaves only a staging
//! directory, which never counts as done; a crash after it leaves a complete
//! artifact. A rerun trusts an artifact only if its manifest verifies.
//!
//! What "verifies" means: the manifest's own digest covers everything in it
//! (metrics included, so an edited accuracy is caught), every file matches
//! its recorded size and SHA-256, and the inputs it was made from are the
//! inputs there now (it records each input manifest's digest), so an
//! artifact made from an input that has since been rebuilt is stale.
//!
//! Staging directories are named for the process that owns them
//! (`crate::owner`), so one process only ever removes its own or those of a
//! process that is provably gone.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::files::{self, hash_file, FileEntry};
use crate::owner::Owner;
use crate::plan::{Plan, StageKind, Task, TaskKey};

const MANIFEST: &str = "manifest.json";
const STAGING_PREFIX: &str = ".staging-";

/// What a completed artifact holds, and what its stage measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub key: TaskKey,
    pub stage: StageKind,
    pub files: Vec<FileEntry>,
    pub metrics: Value,
    pub elapsed_s: f64,
    pub completed_unix: u64,
    /// Each input's manifest digest when this artifact was made.
    #[serde(default)]
    pub inputs: BTreeMap<TaskKey, String>,
    /// SHA-256 of this manifest as JSON with `digest` empty. A manifest
    /// without one (written by an older qsweep) never verifies.
    #[serde(default)]
    pub digest: String,
}

impl Manifest {
    /// A manifest for what a stage just made, with its digest.
    pub fn new(key: TaskKey, stage: StageKind, files: Vec<FileEntry>, metrics: Value, elapsed_s: f64) -> Self {
        Self {
            key,
            stage,
            files,
            metrics,
            elapsed_s,
            completed_unix: unix_now(),
            inputs: BTreeMap::new(),
            digest: String::new(),
        }
        .sealed()
    }

    /// The first 16 hex digits of the digest: enough to tell this
    /// manifest from any other of the same task.
    pub fn short_digest(&self) -> &str {
        &self.digest[..self.digest.len().min(16)]
    }

    /// The same manifest, recording the inputs it was made from.
    pub fn made_from(mut self, inputs: BTreeMap<TaskKey, String>) -> Self {
        self.inputs = inputs;
        self.sealed()
    }

    fn sealed(mut self) -> Self {
        self.digest = self.content_digest();
        self
    }

    fn content_digest(&self) -> String {
        let unsealed = Manifest { digest: String::new(), ..self.clone() };
        hex::encode(Sha256::digest(serde_json::to_vec(&unsealed).expect("a manifest serializes")))
    }

    /// Whether the manifest is what its stage wrote: nothing in it edited.
    pub fn is_intact(&self) -> bool {
        !self.digest.is_empty() && self.digest == self.content_digest()
    }
}

/// The last error of a task that used up its retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub key: TaskKey,
    pub stage: StageKind,
    pub attempts: u32,
    pub error: String,
    pub failed_unix: u64,
    /// The error will repeat until the spec or its files change (a
    /// malformed model, a missing dataset); retrying cannot help.
    #[serde(default)]
    pub fatal: bool,
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

    /// The manifest of a complete artifact whose manifest and files all
    /// verify. Whether it is still current for its task is `current`.
    pub fn verified(&self, key: &TaskKey) -> Option<Manifest> {
        verified_at(&self.artifact_dir(key), key)
    }

    /// The verified artifact of `task`, if it was made from the inputs
    /// that are there now; otherwise the task must run again.
    pub fn current(&self, task: &Task) -> Option<Manifest> {
        self.verified(&task.key).filter(|manifest| self.made_from_current_inputs(task, manifest))
    }

    /// Like `current`, from the manifest alone: for a coordinator whose
    /// artifacts live in an object store and which holds only manifests.
    pub fn current_manifest(&self, task: &Task) -> Option<Manifest> {
        self.manifest(&task.key).filter(|manifest| self.made_from_current_inputs(task, manifest))
    }

    fn made_from_current_inputs(&self, task: &Task, manifest: &Manifest) -> bool {
        self.input_digests(task).is_ok_and(|inputs| manifest.inputs == inputs)
    }

    /// The tasks of `plan` a run would skip: current artifacts whose inputs
    /// are all skipped too (what `qsweep plan` shows as cached).
    pub fn cached_tasks(&self, plan: &Plan) -> std::collections::HashSet<TaskKey> {
        let mut cached = std::collections::HashSet::new();
        // Tasks come after their inputs.
        for task in &plan.tasks {
            if task.inputs.iter().all(|i| cached.contains(&i.key)) && self.current(task).is_some() {
                cached.insert(task.key.clone());
            }
        }
        cached
    }

    /// The manifest digest of each of `task`'s inputs, as they are now.
    pub fn input_digests(&self, task: &Task) -> std::io::Result<BTreeMap<TaskKey, String>> {
        task.inputs
            .iter()
            .map(|input| match self.manifest(&input.key) {
                Some(manifest) => Ok((input.key.clone(), manifest.digest)),
                None => Err(std::io::Error::other(format!(
                    "input {} ({}) of {} has no intact artifact",
                    input.key.short(),
                    input.role,
                    task.stage
                ))),
            })
            .collect()
    }

    /// The manifest of `key`'s artifact for a stage about to read it: every
    /// file hashed again, except those `checked_when_read` says the reader
    /// checks itself as it reads them. The error says what is wrong.
    pub fn checked_input(&self, key: &TaskKey, checked_when_read: impl Fn(&str) -> bool) -> Result<Manifest, String> {
        let dir = self.artifact_dir(key);
        let manifest = self.manifest(key).ok_or("it has no intact manifest")?;
        match manifest.files.iter().find(|f| !checked_when_read(&f.name) && !f.hashes_to_it(&dir.join(&f.name))) {
            Some(damaged) => Err(format!("{} does not match its manifest", dir.join(&damaged.name).display())),
            None => Ok(manifest),
        }
    }

    /// Removes a damaged artifact, so that it counts as not done and is
    /// made again. It is moved to a staging name first (atomic), so no
    /// reader ever sees half of it.
    pub fn set_aside(&self, key: &TaskKey) {
        let dir = self.artifact_dir(key);
        let aside = self.root.join("artifacts").join(format!(
            "{STAGING_PREFIX}{}-damaged-{}",
            key.short(),
            Owner::current().tag()
        ));
        if fs::rename(&dir, &aside).is_ok() {
            tracing::warn!("set aside the damaged artifact {}", dir.display());
            let _ = fs::remove_dir_all(&aside);
        }
    }

    /// The intact manifest of an artifact, without re-hashing its files;
    /// for reports, which must stay fast on large sweeps and only read
    /// metrics. Falls back to manifests fetched from an object store
    /// without their files.
    pub fn manifest(&self, key: &TaskKey) -> Option<Manifest> {
        let local =
            fs::read(self.artifact_dir(key).join(MANIFEST)).or_else(|_| fs::read(self.remote_manifest_path(key)));
        let manifest: Manifest = serde_json::from_slice(&local.ok()?).ok()?;
        (&manifest.key == key && manifest.is_intact()).then_some(manifest)
    }

    /// Where a manifest fetched from an object store, without its files,
    /// is kept for the reports.
    pub fn remote_manifest_path(&self, key: &TaskKey) -> PathBuf {
        self.root.join("remote-manifests").join(format!("{}.json", key.0))
    }

    /// Starts writing the artifact of `key` in a staging directory named
    /// for this process (`.staging-KEY-ATTEMPT-PID.START@HOST`).
    pub fn begin(&self, key: &TaskKey, stage: StageKind) -> std::io::Result<Staging> {
        static ATTEMPT: AtomicU64 = AtomicU64::new(0);
        let attempt = ATTEMPT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{STAGING_PREFIX}{}-{attempt}-{}", key.short(), Owner::current().tag());
        let dir = self.root.join("artifacts").join(name);
        fs::create_dir_all(&dir)?;
        Ok(Staging { dir, key: key.clone(), stage, target: self.artifact_dir(key), committed: false })
    }

    /// Removes the staging directories whose owner is provably gone: a
    /// process of this host that has ended, or one that `also_gone` says
    /// has (a worker elsewhere whose Redis heartbeat expired). Live
    /// owners' work in progress, here or on other hosts, is left alone.
    pub fn remove_abandoned_staging(&self, also_gone: impl Fn(&Owner) -> bool) -> std::io::Result<usize> {
        self.remove_staging(|owner| owner.is_gone_from_this_host() || also_gone(owner))
    }

    /// Removes this process's own staging directories (a worker that
    /// abandons its stages on shutdown).
    pub fn remove_own_staging(&self) -> std::io::Result<usize> {
        let me = Owner::current();
        self.remove_staging(|owner| *owner == me)
    }

    fn remove_staging(&self, remove: impl Fn(&Owner) -> bool) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join("artifacts"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if staging_owner(&name).is_some_and(|owner| remove(&owner)) {
                match fs::remove_dir_all(entry.path()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => removed += 1,
                }
            }
        }
        Ok(removed)
    }

    /// The staging directories there are now, by name.
    pub fn staging_dirs(&self) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.root.join("artifacts"))? {
            let name = entry?.file_name().to_string_lossy().to_string();
            if name.starts_with(STAGING_PREFIX) {
                names.push(name);
            }
        }
        Ok(names)
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

/// The one coordinator's hold on a results directory: an advisory lock
/// (flock) on `.lock`, which the kernel releases when the process ends,
/// however it ends. The file names the holder for whoever finds it taken.
pub struct ResultsLock {
    _file: fs::File,
}

/// Who holds a results directory's lock, as its lock file says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockHolder {
    pub owner: Owner,
    pub command: String,
    pub since_unix: u64,
}

impl ResultsDir {
    /// Takes the results directory for this process, or says who has it.
    pub fn lock(&self, command: &str) -> Result<ResultsLock, std::io::Error> {
        use std::os::fd::AsRawFd;
        let path = self.root.join(".lock");
        let mut file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(error);
            }
            // The holder writes its name just after it locks: give it a moment.
            let holder = (0..20).find_map(|_| {
                let holder = fs::read(&path).ok().and_then(|bytes| serde_json::from_slice::<LockHolder>(&bytes).ok());
                holder.or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    None
                })
            });
            let who = match holder {
                Some(h) => format!("`{}` ({}) since {}", h.command, h.owner, h.since_unix),
                None => "another qsweep process".to_string(),
            };
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by {who}\n  fix: wait for that sweep to finish or stop it; two coordinators on one results directory would run every task twice",
                    self.root.display()
                ),
            ));
        }
        let holder = LockHolder { owner: Owner::current(), command: command.to_string(), since_unix: unix_now() };
        file.set_len(0)?;
        std::io::Seek::rewind(&mut file)?;
        file.write_all(&serde_json::to_vec(&holder).map_err(std::io::Error::other)?)?;
        Ok(ResultsLock { _file: file })
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
    pub fn adopt(self, manifest: &Manifest) -> std::io::Result<Manifest> {
        if !manifest.is_intact() {
            return Err(std::io::Error::other(format!("the manifest of {} has been altered", manifest.key)));
        }
        if let Some(entry) = manifest.files.iter().find(|entry| !entry.hashes_to_it(&self.dir.join(&entry.name))) {
            return Err(std::io::Error::other(format!("{} does not match its manifest", entry.name)));
        }
        let bytes = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
        write_atomically(&self.dir.join(MANIFEST), &bytes)?;
        self.install(manifest.clone())
    }

    /// Seals the artifact: hashes its files, writes the manifest (with the
    /// digests of the inputs it was made from), and makes it visible under
    /// its key in one rename.
    pub fn commit(
        self,
        metrics: Value,
        elapsed_s: f64,
        inputs: BTreeMap<TaskKey, String>,
    ) -> std::io::Result<Manifest> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().expect("a directory entry has a name").to_string_lossy().to_string();
            let (bytes, sha256) = hash_file(&path)?;
            let file = fs::File::open(&path)?;
            file.sync_all()?;
            let modified_ns = files::modified_ns(&file.metadata()?);
            files.push(FileEntry { name, bytes, sha256, modified_ns });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let manifest = Manifest::new(self.key.clone(), self.stage, files, metrics, elapsed_s).made_from(inputs);
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
        let mut file = fs::File::create(self.dir.join(MANIFEST))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        self.install(manifest)
    }

    /// Puts the sealed directory under its key. If another worker completed
    /// the same key from the same inputs first, theirs is kept (the outputs
    /// are equivalent) and returned. If what is there is damaged or stale,
    /// ours replaces it in one atomic exchange, so readers see the old
    /// artifact or the new one, never a mix or nothing.
    fn install(mut self, ours: Manifest) -> std::io::Result<Manifest> {
        let installed = match fs::rename(&self.dir, &self.target) {
            Ok(()) => ours,
            Err(_) if self.target.exists() => match verified_at(&self.target, &self.key) {
                Some(theirs) if theirs.inputs == ours.inputs => {
                    fs::remove_dir_all(&self.dir)?;
                    theirs
                }
                _ => {
                    exchange(&self.dir, &self.target)?;
                    // The staging path now holds the damaged artifact.
                    fs::remove_dir_all(&self.dir)?;
                    ours
                }
            },
            Err(e) => return Err(e),
        };
        sync_dir(self.target.parent().expect("artifacts live in a directory"));
        self.committed = true;
        Ok(installed)
    }
}

/// Swaps two directories atomically (Linux renameat2 RENAME_EXCHANGE).
/// Where the filesystem cannot, the old one is moved aside first, so for a
/// moment there is no artifact, which reads as not done: still never a
/// damaged one.
fn exchange(ours: &Path, theirs: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |path: &Path| std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(ours)?, c(theirs)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let swapped =
        unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if swapped == 0 {
        return Ok(());
    }
    let mut aside = ours.as_os_str().to_os_string();
    aside.push(".replaced");
    fs::rename(theirs, &aside)?;
    fs::rename(ours, theirs)?;
    fs::rename(&aside, ours)
}

/// The manifest in `dir` if it is intact, is for `key`, and every file
/// it lists matches.
fn verified_at(dir: &Path, key: &TaskKey) -> Option<Manifest> {
    let manifest: Manifest = serde_json::from_slice(&fs::read(dir.join(MANIFEST)).ok()?).ok()?;
    if &manifest.key != key || !manifest.is_intact() {
        return None;
    }
    let intact = manifest.files.iter().all(|entry| entry.matches(&dir.join(&entry.name)));
    intact.then_some(manifest)
}

/// The owner named in a staging directory's name, if it is one.
fn staging_owner(name: &str) -> Option<Owner> {
    let rest = name.strip_prefix(STAGING_PREFIX)?;
    let (_key, rest) = rest.split_once('-')?;
    let (_attempt, tag) = rest.split_once('-')?;
    Owner::from_tag(tag)
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
        let manifest = staging.commit(serde_json::json!({"size": 5}), 0.1, BTreeMap::new()).unwrap();
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
        staging.commit(Value::Null, 0.0, BTreeMap::new()).unwrap();
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

    fn task(key: &TaskKey, inputs: &[&TaskKey]) -> Task {
        Task {
            key: key.clone(),
            stage: StageKind::Build,
            params: Value::Null,
            inputs: inputs.iter().map(|k| crate::plan::Input { role: "input".into(), key: (*k).clone() }).collect(),
        }
    }

    fn make(results: &ResultsDir, key: &TaskKey, content: &[u8], metrics: Value, inputs: &[&TaskKey]) -> Manifest {
        let digests = results.input_digests(&task(key, inputs)).unwrap();
        let staging = results.begin(key, StageKind::Build).unwrap();
        fs::write(staging.dir().join("model.onnx"), content).unwrap();
        staging.commit(metrics, 0.0, digests).unwrap()
    }

    /// An edited metric makes the manifest, and so the artifact, untrusted.
    #[test]
    fn an_edited_metric_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::create(dir.path()).unwrap();
        let k = key("d");
        make(&results, &k, b"bytes", serde_json::json!({"accuracy": 0.9159}), &[]);
        let path = results.artifact_dir(&k).join(MANIFEST);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("0.9159", "0.9959")).unwrap();
        assert!(results.verified(&k).is_none());
        assert!(results.manifest(&k).is_none(), "reports must not read an altered manifest either");
    }

    /// A stage re-executed over a damaged artifact replaces it under the
    /// same key; over an intact one made from the same inputs, the first
    /// is kept.
    #[test]
    fn a_damaged_artifact_is_replaced_and_an_intact_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::create(dir.path()).unwrap();
        let k = key("e");
        let first = make(&results, &k, b"first", Value::Null, &[]);
        let kept = make(&results, &k, b"second", Value::Null, &[]);
        assert_eq!(kept, first, "an intact artifact from the same inputs is kept");
        fs::write(results.artifact_dir(&k).join("model.onnx"), b"damage").unwrap();
        let healed = make(&results, &k, b"third", Value::Null, &[]);
        assert_eq!(results.verified(&k), Some(healed));
        assert_eq!(fs::read(results.artifact_dir(&k).join("model.onnx")).unwrap(), b"third");
        assert!(results.staging_dirs().unwrap().is_empty(), "the damaged copy is gone");
    }

    /// An artifact made from an input that has since been rebuilt is stale.
    #[test]
    fn an_artifact_of_a_rebuilt_input_is_not_current() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::create(dir.path()).unwrap();
        let (input, output) = (key("f"), key("g"));
        make(&results, &input, b"input", serde_json::json!({"v": 1}), &[]);
        make(&results, &output, b"output", Value::Null, &[&input]);
        assert!(results.current(&task(&output, &[&input])).is_some());
        fs::write(results.artifact_dir(&input).join("model.onnx"), b"damage").unwrap();
        make(&results, &input, b"input", serde_json::json!({"v": 2}), &[]);
        assert!(results.verified(&output).is_some(), "its own files are intact");
        assert!(results.current(&task(&output, &[&input])).is_none(), "but it was made from the old input");
    }

    /// Only staging of a provably gone owner is swept: a live process's,
    /// here or elsewhere, is left alone.
    #[test]
    fn only_abandoned_staging_is_swept() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::create(dir.path()).unwrap();
        let mine = results.begin(&key("h"), StageKind::Build).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = Owner { host: crate::owner::host(), pid: child.id(), started: 1 };
        child.wait().unwrap();
        let elsewhere = Owner { host: "another-host".into(), pid: 1, started: 1 };
        for (n, owner) in [dead, elsewhere].iter().enumerate() {
            fs::create_dir_all(dir.path().join(format!(
                "artifacts/{STAGING_PREFIX}{}-{n}-{}",
                key("i").short(),
                owner.tag()
            )))
            .unwrap();
        }
        assert_eq!(results.remove_abandoned_staging(|_| false).unwrap(), 1);
        let left = results.staging_dirs().unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(mine.dir().exists());
        assert!(left.iter().any(|name| name.ends_with("@another-host")));
        // Redis says the other host's worker has gone: now it goes too.
        assert_eq!(results.remove_abandoned_staging(|owner| owner.host == "another-host").unwrap(), 1);
        assert_eq!(results.remove_own_staging().unwrap(), 1);
        assert!(results.staging_dirs().unwrap().is_empty());
    }

    /// A second holder of the results directory is refused, and told who
    /// holds it; the lock goes with its holder.
    #[test]
    fn one_process_holds_the_results_directory() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::create(dir.path()).unwrap();
        let held = results.lock("qsweep run a.json").unwrap();
        // flock locks belong to open files: a second open is a second holder.
        let refused = results.lock("qsweep run b.json").err().expect("the directory is held");
        assert!(refused.to_string().contains("qsweep run a.json"), "{refused}");
        assert!(refused.to_string().contains(&format!("pid {}", std::process::id())), "{refused}");
        drop(held);
        assert!(results.lock("qsweep run b.json").is_ok());
    }
}
