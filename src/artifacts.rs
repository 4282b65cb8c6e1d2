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

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
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

/// Bytes per part when publishing, and per write to disk when fetching.
/// Artifacts (sharded prepared image data) run to many GB, so files move
/// a part at a time, never whole. Every store accepts parts of 5 MiB and
/// up, and S3 allows 10,000 parts to an object: 16 MiB parts carry
/// objects up to 160 GB.
const PART_BYTES: usize = 16 << 20;

/// Parts of one file uploading at once: enough to keep a link to the
/// store busy, while a publish holds at most one part more than this in
/// memory (80 MiB), however large the file.
const PARTS_IN_FLIGHT: usize = 4;

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
    /// and verifying it if needed). Fails if the store lacks it. Each file
    /// is written as it arrives, so a fetch holds about one part in memory
    /// however large the artifact; a fetch that fails partway leaves
    /// nothing behind (its staging directory is removed).
    pub async fn fetch(&self, results: &ResultsDir, key: &TaskKey) -> Result<(), ArtifactError> {
        if verified(results, key).await?.is_some() {
            return Ok(());
        }
        let manifest = self
            .manifest(key)
            .await?
            .ok_or_else(|| ArtifactError::MissingInput { url: self.url.clone(), key: key.0.clone() })?;
        let staging = results.begin(key, manifest.stage)?;
        for entry in &manifest.files {
            let found = self.store.get(&self.object(key, &entry.name)).await.map_err(|e| self.error(e))?;
            self.download(found.into_stream(), &staging.dir().join(&entry.name), PART_BYTES).await?;
        }
        blocking(move || staging.adopt(&manifest)).await?;
        Ok(())
    }

    /// Uploads a complete local artifact: files first, manifest last. Each
    /// file is streamed in parts (see `upload_file`), never read whole.
    pub async fn publish(&self, results: &ResultsDir, key: &TaskKey) -> Result<(), ArtifactError> {
        let manifest = verified(results, key).await?.ok_or_else(|| ArtifactError::Store {
            url: self.url.clone(),
            message: format!("no complete local artifact {key} to publish"),
        })?;
        let dir = results.artifact_dir(key);
        for entry in &manifest.files {
            let upload = self.store.put_multipart(&self.object(key, &entry.name)).await.map_err(|e| self.error(e))?;
            self.upload_file(&dir.join(&entry.name), upload, PART_BYTES).await?;
        }
        let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        self.store.put(&self.object(key, "manifest.json"), PutPayload::from(bytes)).await.map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Streams the local file at `path` into `upload`, `part_bytes` at a
    /// time (a parameter so that tests can use small parts). The next part
    /// is read only once fewer than `PARTS_IN_FLIGHT` are uploading, so a
    /// slow store holds the reading back instead of the file piling up in
    /// memory. Every file takes this one path, small ones as a single part
    /// (an empty one as none, which every store completes as an empty
    /// object); the object appears only when the upload completes, so a
    /// reader never sees half a file. A failed upload is aborted, so the
    /// store keeps no orphaned parts (S3 keeps and bills those until a
    /// lifecycle rule removes them; one is still wise, for workers that
    /// die mid-upload).
    async fn upload_file(
        &self,
        path: &Path,
        upload: Box<dyn MultipartUpload>,
        part_bytes: usize,
    ) -> Result<(), ArtifactError> {
        let mut file = std::fs::File::open(path).map_err(|e| local(path, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_bytes);
        loop {
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(self.error(e));
            }
            let part;
            (file, part) = match blocking(move || read_part(file, part_bytes)).await {
                Ok(read) => read,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(local(path, e));
                }
            };
            let last = part.len() < part_bytes;
            if !part.is_empty() {
                // A whole part goes to the store as it is, without a copy.
                writer.put(part.into());
            }
            if last {
                break;
            }
        }
        writer.finish().await.map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Writes an object's `body` to the local file at `path` as it
    /// arrives, in writes of about `buffer_bytes` (a parameter so that
    /// tests can use small ones): what has arrived but is not yet on disk
    /// stays under one buffer, however large the object.
    async fn download<B: AsRef<[u8]> + Send + 'static>(
        &self,
        body: impl Stream<Item = object_store::Result<B>>,
        path: &Path,
        buffer_bytes: usize,
    ) -> Result<(), ArtifactError> {
        let mut body = std::pin::pin!(body);
        let mut file = std::fs::File::create(path).map_err(|e| local(path, e))?;
        let (mut pending, mut pending_bytes) = (Vec::new(), 0);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.error(e))?;
            pending_bytes += chunk.as_ref().len();
            pending.push(chunk);
            if pending_bytes >= buffer_bytes {
                file = write_chunks(file, std::mem::take(&mut pending), path).await?;
                pending_bytes = 0;
            }
        }
        write_chunks(file, pending, path).await?;
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

/// Runs blocking file work (reading, writing, and hashing whole
/// artifacts, which for prepared data is many GB) on tokio's blocking
/// threads, so that it does not stall the async threads the worker's
/// other tasks share. A panic there goes on as a panic here.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// `results.verified(key)`, which hashes every file, off the async threads.
async fn verified(results: &ResultsDir, key: &TaskKey) -> Result<Option<Manifest>, ArtifactError> {
    let (results, key) = (results.clone(), key.clone());
    Ok(blocking(move || Ok(results.verified(&key))).await?)
}

/// Reads the next `bytes` of `file`, fewer only at its end (so every part
/// but the last is full size, as S3 and R2 require).
fn read_part(mut file: std::fs::File, bytes: usize) -> std::io::Result<(std::fs::File, Vec<u8>)> {
    let mut part = vec![0; bytes];
    let mut filled = 0;
    while filled < bytes {
        match file.read(&mut part[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    part.truncate(filled);
    Ok((file, part))
}

/// Appends `chunks` to `file`, off the async threads.
async fn write_chunks<B: AsRef<[u8]> + Send + 'static>(
    mut file: std::fs::File,
    chunks: Vec<B>,
    path: &Path,
) -> Result<std::fs::File, ArtifactError> {
    let written = blocking(move || {
        chunks.iter().try_for_each(|chunk| file.write_all(chunk.as_ref()))?;
        Ok(file)
    });
    written.await.map_err(|e| local(path, e))
}

/// A local file error that says which file.
fn local(path: &Path, e: std::io::Error) -> ArtifactError {
    ArtifactError::Local(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
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

    /// Bytes in which every 4-byte word holds its own index, so a part
    /// lost, repeated or out of order shows; `tail` bytes past whole words
    /// make the last part a short one.
    fn patterned(words: u32, tail: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..words).flat_map(u32::to_le_bytes).collect();
        bytes.extend((0..tail).map(|i| i as u8 ^ 0x5a));
        bytes
    }

    /// Files of several parts (sharded image data runs to many GB) cross
    /// a real store byte for byte, alongside an empty one (no parts).
    #[tokio::test]
    async fn files_larger_than_a_part_cross_the_store_intact() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectArtifacts::open(&format!("file://{}", dir.path().join("store").display())).unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let (here, there) =
            (ResultsDir::create(&dir.path().join("a")).unwrap(), ResultsDir::create(&dir.path().join("b")).unwrap());
        let key = TaskKey("ef".repeat(32));
        let shard = patterned((40 << 20) / 4, 3);
        assert!(shard.len() > 2 * PART_BYTES);
        let staging = here.begin(&key, crate::plan::StageKind::Build).unwrap();
        std::fs::write(staging.dir().join("shard-0.bin"), &shard).unwrap();
        std::fs::write(staging.dir().join("empty.bin"), b"").unwrap();
        staging.commit(serde_json::json!({}), 0.5, Default::default()).unwrap();
        store.publish(&here, &key).await.unwrap();
        store.fetch(&there, &key).await.unwrap();
        assert!(there.verified(&key).is_some(), "the fetched copy verifies");
        let fetched = std::fs::read(there.artifact_dir(&key).join("shard-0.bin")).unwrap();
        let first_difference = fetched.iter().zip(&shard).position(|(a, b)| a != b);
        assert!(
            fetched.len() == shard.len() && first_difference.is_none(),
            "{} bytes, first difference at {first_difference:?}",
            fetched.len()
        );
        assert_eq!(std::fs::read(there.artifact_dir(&key).join("empty.bin")).unwrap(), b"");
    }

    /// What a `Slow` upload saw.
    #[derive(Debug, Default)]
    struct PartLog {
        sizes: Vec<usize>,
        in_flight: usize,
        most_in_flight: usize,
    }

    /// A multipart upload to another, whose parts each take a while, as
    /// parts to S3 from a busy link do.
    #[derive(Debug)]
    struct Slow {
        inner: Box<dyn MultipartUpload>,
        log: Arc<std::sync::Mutex<PartLog>>,
    }

    // Written out as `async_trait` would expand it, which this crate does
    // not depend on.
    impl MultipartUpload for Slow {
        fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
            {
                let mut log = self.log.lock().unwrap();
                log.sizes.push(data.content_length());
                log.in_flight += 1;
                log.most_in_flight = log.most_in_flight.max(log.in_flight);
            }
            let (part, log) = (self.inner.put_part(data), self.log.clone());
            Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                let done = part.await;
                log.lock().unwrap().in_flight -= 1;
                done
            })
        }

        fn complete<'life0, 'async_trait>(
            &'life0 mut self,
        ) -> futures::future::BoxFuture<'async_trait, object_store::Result<object_store::PutResult>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            self.inner.complete()
        }

        fn abort<'life0, 'async_trait>(
            &'life0 mut self,
        ) -> futures::future::BoxFuture<'async_trait, object_store::Result<()>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            self.inner.abort()
        }
    }

    /// Publishing reads a file a part at a time and reads on only as parts
    /// finish uploading, so a slow store cannot make a large file pile up
    /// in memory: no part is larger than asked, and no more than
    /// `PARTS_IN_FLIGHT` are held at once (without the wait all twenty
    /// would be), yet parts do upload side by side.
    #[tokio::test]
    async fn uploads_hold_a_bounded_number_of_parts() {
        const PART: usize = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.bin");
        let data = patterned((20 * PART / 4) as u32, 5);
        std::fs::write(&path, &data).unwrap();
        let memory = object_store::memory::InMemory::new();
        let object = ObjectPath::from("shard.bin");
        let log = Arc::new(std::sync::Mutex::new(PartLog::default()));
        let upload = Slow { inner: memory.put_multipart(&object).await.unwrap(), log: log.clone() };
        let store = ObjectArtifacts::open(&format!("file://{}", dir.path().display())).unwrap();
        store.upload_file(&path, Box::new(upload), PART).await.unwrap();
        let (sizes, most_in_flight) = {
            let log = log.lock().unwrap();
            (log.sizes.clone(), log.most_in_flight)
        };
        let mut expected = vec![PART; 20];
        expected.push(5);
        assert_eq!(sizes, expected);
        assert!(most_in_flight <= PARTS_IN_FLIGHT, "{most_in_flight} parts were held at once");
        assert!(most_in_flight > 1, "parts uploaded one at a time");
        assert!(memory.get(&object).await.unwrap().bytes().await.unwrap() == data, "the object is the file");
    }

    /// Fetching writes an object to disk as its body arrives, not after:
    /// what has arrived but is not yet written stays under one buffer.
    #[tokio::test]
    async fn downloads_write_as_the_body_arrives() {
        const CHUNK: usize = 64 << 10;
        const BUFFER: usize = 4 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.bin");
        let data = patterned((40 * CHUNK / 4) as u32, 0);
        let most_behind = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let body = futures::stream::unfold(0, {
            let (data, path, most_behind) = (data.clone(), path.clone(), most_behind.clone());
            move |at: usize| {
                // Asked for more: everything before `at` has been handled.
                let on_disk = std::fs::metadata(&path).map_or(0, |m| m.len());
                most_behind.fetch_max(at as u64 - on_disk, std::sync::atomic::Ordering::Relaxed);
                let chunk = (at < data.len()).then(|| data[at..(at + CHUNK).min(data.len())].to_vec());
                async move { chunk.map(|chunk| (Ok(chunk.clone()), at + chunk.len())) }
            }
        });
        let store = ObjectArtifacts::open(&format!("file://{}", dir.path().display())).unwrap();
        store.download(body, &path, BUFFER).await.unwrap();
        let behind = most_behind.load(std::sync::atomic::Ordering::Relaxed);
        assert!(behind < BUFFER as u64, "{behind} bytes had arrived and were not yet on disk");
        assert!(std::fs::read(&path).unwrap() == data, "the file is the body");
    }

    /// A body that fails partway fails the download with the store's error
    /// (the caller's staging directory then goes, and the partial file
    /// with it).
    #[tokio::test]
    async fn a_body_that_breaks_off_fails_the_download() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectArtifacts::open(&format!("file://{}", dir.path().display())).unwrap();
        let body = futures::stream::iter(vec![
            Ok(vec![1u8; 10]),
            Err(object_store::Error::Generic { store: "test", source: "connection reset".into() }),
        ]);
        match store.download(body, &dir.path().join("shard.bin"), 1 << 20).await {
            Err(ArtifactError::Store { message, .. }) => assert!(message.contains("connection reset"), "{message}"),
            other => panic!("expected a store error, got {other:?}"),
        }
    }
}
