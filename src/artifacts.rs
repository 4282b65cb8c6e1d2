//! Where artifacts are shared between machines.
//!
//! By default every worker reads and writes the one results directory at
//! the same path (a shared filesystem). With an object-store URL (`s3://`
//! for clusters, through the object_store crate; `file://` works too),
//! each machine keeps a local cache in its own results directory and the
//! store holds the shared copy: a worker fetches a task's inputs by key
//! before running it and publishes the task's artifact after it. An
//! artifact is published files first and manifest last, so a manifest in
//! the store means a complete artifact. Credentials come from each
//! machine's environment (AWS_* variables), never from the spec or Redis.

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use thiserror::Error;

use crate::plan::{Task, TaskKey};
use crate::store::{Manifest, ResultsDir};

#[derive(Debug, Error)]
pub enum ArtifactError {
    #[error("{url} is not an artifact store URL: {message}\n  fix: use s3://bucket/prefix (credentials from AWS_* variables) or file:///absolute/dir")]
    BadUrl { url: String, message: String },
    #[error("artifact store {url}: {message}")]
    Store { url: String, message: String },
    #[error("input artifact {key} is not in the artifact store {url}; was its stage run against another store?")]
    MissingInput { url: String, key: String },
    #[error("{0}")]
    Local(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct ObjectArtifacts {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl ObjectArtifacts {
    pub fn open(url: &str) -> Result<Self, ArtifactError> {
        let bad = |message: String| ArtifactError::BadUrl { url: url.to_string(), message };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let options = std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (store, prefix) = object_store::parse_url_opts(&parsed, options).map_err(|e| bad(e.to_string()))?;
        Ok(Self { url: url.to_string(), store: Arc::from(store), prefix })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn object(&self, key: &TaskKey, name: &str) -> ObjectPath {
        self.prefix.clone().join(key.0.as_str()).join(name)
    }

    fn error(&self, e: object_store::Error) -> ArtifactError {
        ArtifactError::Store { url: self.url.clone(), message: e.to_string() }
    }

    /// The manifest of `key` in the store, if its artifact is complete
    /// there and the manifest is intact (an altered one counts as absent,
    /// so the task runs again and replaces it).
    pub async fn manifest(&self, key: &TaskKey) -> Result<Option<Manifest>, ArtifactError> {
        match self.store.get(&self.object(key, "manifest.json")).await {
            Ok(found) => {
                let bytes = found.bytes().await.map_err(|e| self.error(e))?;
                let manifest = serde_json::from_slice::<Manifest>(&bytes).ok();
                Ok(manifest.filter(|m| &m.key == key && m.is_intact()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Makes `key`'s artifact complete in the local `results` (downloading
    /// and verifying it if needed). Fails if the store lacks it.
    pub async fn fetch(&self, results: &ResultsDir, key: &TaskKey) -> Result<(), ArtifactError> {
        if results.verified(key).is_some() {
            return Ok(());
        }
        let manifest = self
            .manifest(key)
            .await?
            .ok_or_else(|| ArtifactError::MissingInput { url: self.url.clone(), key: key.0.clone() })?;
        let staging = results.begin(key, manifest.stage)?;
        for entry in &manifest.files {
            let found = self.store.get(&self.object(key, &entry.name)).await.map_err(|e| self.error(e))?;
            let bytes = found.bytes().await.map_err(|e| self.error(e))?;
            std::fs::write(staging.dir().join(&entry.name), &bytes)?;
        }
        staging.adopt(&manifest)?;
        Ok(())
    }

    /// Uploads a complete local artifact: files first, manifest last.
    pub async fn publish(&self, results: &ResultsDir, key: &TaskKey) -> Result<(), ArtifactError> {
        let manifest = results.verified(key).ok_or_else(|| ArtifactError::Store {
            url: self.url.clone(),
            message: format!("no complete local artifact {key} to publish"),
        })?;
        let dir = results.artifact_dir(key);
        for entry in &manifest.files {
            let bytes = std::fs::read(dir.join(&entry.name))?;
            self.store.put(&self.object(key, &entry.name), PutPayload::from(bytes)).await.map_err(|e| self.error(e))?;
        }
        let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        self.store.put(&self.object(key, "manifest.json"), PutPayload::from(bytes)).await.map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Copies `key`'s manifest alone into the local results, for reports;
    /// one the store no longer has (or has altered) is removed here too.
    pub async fn fetch_manifest(&self, results: &ResultsDir, key: &TaskKey) -> Result<bool, ArtifactError> {
        let Some(manifest) = self.manifest(key).await? else {
            match std::fs::remove_file(results.remote_manifest_path(key)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => return Ok(false),
            }
        };
        let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        crate::store::write_atomically(&results.remote_manifest_path(key), &bytes)?;
        Ok(true)
    }
}

/// Where the coordinator tells whether a task's artifact is complete and
/// current.
#[derive(Clone, Copy)]
pub enum Artifacts<'a> {
    /// The results directory every worker shares: files and manifests.
    Shared(&'a ResultsDir),
    /// An object store; the coordinator keeps only manifests, in `results`.
    Store { results: &'a ResultsDir, store: &'a ObjectArtifacts },
}

impl Artifacts<'_> {
    /// Where the reports and failure records go.
    pub fn results(&self) -> &ResultsDir {
        match self {
            Artifacts::Shared(results) | Artifacts::Store { results, .. } => results,
        }
    }

    /// Whether `task`'s artifact is there, verifies, and was made from
    /// its inputs as they are now.
    pub async fn current(&self, task: &Task) -> Result<bool, ArtifactError> {
        match self {
            Artifacts::Shared(results) => Ok(results.current(task).is_some()),
            Artifacts::Store { results, store } => {
                store.fetch_manifest(results, &task.key).await?;
                Ok(results.current_manifest(task).is_some())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose input is not in the store says which and where,
    /// instead of waiting for it.
    #[tokio::test]
    async fn a_missing_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectArtifacts::open(&format!("file://{}", dir.path().display())).unwrap();
        let results = ResultsDir::create(&dir.path().join("cache")).unwrap();
        let key = TaskKey("ab".repeat(32));
        match store.fetch(&results, &key).await {
            Err(ArtifactError::MissingInput { key: missing, url }) => {
                assert_eq!(missing, key.0);
                assert!(url.starts_with("file://"));
            }
            other => panic!("expected a missing input, got {other:?}"),
        }
    }

    #[test]
    fn unknown_schemes_are_refused_with_the_fix() {
        let error = ObjectArtifacts::open("ftp://host/dir").err().expect("ftp is not a store");
        assert!(error.to_string().contains("s3://bucket/prefix"), "{error}");
    }

    /// What is published can be fetched elsewhere, byte for byte.
    #[tokio::test]
    async fn published_artifacts_fetch_into_another_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectArtifacts::open(&format!("file://{}", dir.path().join("store").display())).unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let (here, there) =
            (ResultsDir::create(&dir.path().join("a")).unwrap(), ResultsDir::create(&dir.path().join("b")).unwrap());
        let key = TaskKey("cd".repeat(32));
        let staging = here.begin(&key, crate::plan::StageKind::Build).unwrap();
        std::fs::write(staging.dir().join("model.onnx"), b"weights").unwrap();
        staging.commit(serde_json::json!({"x": 1}), 0.5, Default::default()).unwrap();
        store.publish(&here, &key).await.unwrap();
        store.fetch(&there, &key).await.unwrap();
        let fetched = there.verified(&key).expect("a verified copy");
        assert_eq!(fetched.metrics["x"], 1);
        assert_eq!(std::fs::read(there.artifact_dir(&key).join("model.onnx")).unwrap(), b"weights");
    }
}
