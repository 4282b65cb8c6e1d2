//! Prepared data: what prepare-data writes once and every later stage reads.
//!
//! Samples are stored as the model will see them *before* normalisation:
//! decoded, resized and cropped pixels as u8 (a quarter of f32, so
//! ImageNet's 50,000 validation images are 7.5 GB rather than 30), or a
//! tensor file's own element type. They sit in shards of about 64 MiB of
//! raw little-endian rows, listed by an index (`prepared.json`) that also
//! carries the normalisation, applied as batches are read. Labels are a
//! small `labels.npy` (i64).
//!
//! Readers never hash a split up front. Each shard is checked against the
//! artifact's manifest the first time a reader touches it, so a stage
//! verifies exactly what it reads, as it reads it, and a cached rerun reads
//! nothing. Sequential readers prefetch: a thread reads and normalises the
//! next batches while the caller runs the current one.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, OnceLock};

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::tensor_file;
use crate::files::FileEntry;
use crate::spec::Preprocess;

pub const INDEX: &str = "prepared.json";
pub const LABELS: &str = "labels.npy";
/// Shards are cut at about this size: small enough to verify in a blink
/// when first read, large enough that a split is a few hundred files.
const SHARD_BYTES: usize = 64 << 20;
/// Whether an artifact's file is one `PreparedSet` checks against the
/// manifest as it reads it (the index, the labels, each shard on first
/// use), so the store need not hash it before a stage starts.
pub fn checked_when_read(name: &str) -> bool {
    name == INDEX || name == LABELS || (name.starts_with("shard-") && name.ends_with(".bin"))
}

/// Batches a sequential reader keeps ready ahead of its caller.
const PREFETCH: usize = 2;

#[derive(Debug, Error)]
pub enum PreparedError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{dir} has {available} bytes free, but the prepared data needs {needed} more\n  fix: free space there or point --results at a larger disk")]
    NoSpace { dir: PathBuf, needed: u64, available: u64 },
    #[error("{path} is damaged: {reason}; it is set aside and prepared again by the next `qsweep run`")]
    Damaged { path: PathBuf, reason: String },
}

impl PreparedError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        PreparedError::Io { path: path.to_path_buf(), source }
    }
}

/// The element type samples are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stored {
    U8,
    F16,
    F32,
}

impl Stored {
    pub fn size(self) -> usize {
        match self {
            Stored::U8 => 1,
            Stored::F16 => 2,
            Stored::F32 => 4,
        }
    }

    fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            Stored::U8 => out.iter_mut().zip(bytes).for_each(|(o, &b)| *o = f32::from(b)),
            Stored::F16 => out
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Stored::F32 => out
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        }
    }
}

/// `(x / scale - mean[c]) / std[c]` per channel: torchvision's `ToTensor`
/// then `Normalize`, applied as batches are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    pub scale: f32,
    /// One value, or one per channel.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// The channel axis within a sample (0 for NCHW, the last for NHWC).
    pub channel_axis: usize,
}

impl Normalize {
    /// The spec's normalisation, for samples whose channels are on `channel_axis`.
    pub fn new(preprocess: &Preprocess, channel_axis: usize) -> Self {
        Self { scale: preprocess.scale, mean: preprocess.mean.clone(), std: preprocess.std.clone(), channel_axis }
    }

    /// Normalises one sample of `shape` in place.
    pub fn apply(&self, shape: &[usize], values: &mut [f32]) {
        let inner: usize = shape[self.channel_axis + 1..].iter().product();
        let channels = shape[self.channel_axis];
        let pick = |list: &[f32], c: usize| if list.len() == 1 { list[0] } else { list[c] };
        // One channel per run of `inner` values, so the inner loop has
        // constants only and vectorizes.
        for (run, values) in values.chunks_mut(inner.max(1)).enumerate() {
            let c = run % channels;
            let (mean, std) = (pick(&self.mean, c), pick(&self.std, c));
            values.iter_mut().for_each(|value| *value = (*value / self.scale - mean) / std);
        }
    }
}

/// `prepared.json`: what the shards hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub dtype: Stored,
    /// One sample's shape, in the model's layout.
    pub sample_shape: Vec<usize>,
    pub count: usize,
    /// Rows in every shard but the last.
    pub rows_per_shard: usize,
    pub shards: Vec<String>,
    /// None: stored values are model inputs already.
    pub normalize: Option<Normalize>,
    pub labelled: bool,
}

impl Index {
    fn row_bytes(&self) -> usize {
        self.sample_shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Writes a split's rows into shards, in order, checking first that the
/// disk can hold them.
pub struct ShardWriter {
    dir: PathBuf,
    index: Index,
    row_bytes: usize,
    written: usize,
    shard: Option<(PathBuf, BufWriter<File>)>,
}

impl ShardWriter {
    /// Shards for `count` samples of `sample_shape` in `dir`.
    pub fn create(
        dir: &Path,
        dtype: Stored,
        sample_shape: &[usize],
        count: usize,
        normalize: Option<Normalize>,
    ) -> Result<Self, PreparedError> {
        let row_bytes = sample_shape.iter().product::<usize>() * dtype.size();
        let needed = (count * (row_bytes + 8)) as u64;
        let available = free_bytes(dir)?;
        if available < needed {
            return Err(PreparedError::NoSpace { dir: dir.to_path_buf(), needed, available });
        }
        let index = Index {
            dtype,
            sample_shape: sample_shape.to_vec(),
            count,
            rows_per_shard: (SHARD_BYTES / row_bytes.max(1)).max(1),
            shards: Vec::new(),
            normalize,
            labelled: false,
        };
        Ok(Self { dir: dir.to_path_buf(), index, row_bytes, written: 0, shard: None })
    }

    /// Appends whole rows, as stored (`dtype`, little-endian).
    pub fn append(&mut self, rows: &[u8]) -> Result<(), PreparedError> {
        assert_eq!(rows.len() % self.row_bytes.max(1), 0, "whole rows only");
        for row in rows.chunks(self.row_bytes.max(1)) {
            assert!(self.written < self.index.count, "more rows than the shards were made for");
            if self.written.is_multiple_of(self.index.rows_per_shard) {
                self.close_shard()?;
                let name = format!("shard-{:05}.bin", self.index.shards.len());
                let path = self.dir.join(&name);
                let file = File::create(&path).map_err(|e| self.write_error(&path, e))?;
                self.index.shards.push(name);
                self.shard = Some((path, BufWriter::with_capacity(1 << 20, file)));
            }
            let (path, file) = self.shard.as_mut().expect("a shard is open");
            if let Err(e) = file.write_all(row) {
                let path = path.clone();
                return Err(self.write_error(&path, e));
            }
            self.written += 1;
        }
        Ok(())
    }

    /// Closes the last shard and writes the labels (if any) and the index.
    pub fn finish(mut self, labels: Option<&[i64]>) -> Result<Index, PreparedError> {
        if self.written != self.index.count {
            return Err(PreparedError::io(
                &self.dir,
                std::io::Error::other(format!("{} of {} samples written", self.written, self.index.count)),
            ));
        }
        self.close_shard()?;
        if let Some(labels) = labels {
            let path = self.dir.join(LABELS);
            tensor_file::write_npy(&path, &ndarray::ArrayView1::from(labels).into_dyn())
                .map_err(|e| self.write_error(&path, e))?;
            self.index.labelled = true;
        }
        let path = self.dir.join(INDEX);
        let json = serde_json::to_vec_pretty(&self.index).expect("an index serializes");
        std::fs::write(&path, json).map_err(|e| self.write_error(&path, e))?;
        Ok(self.index)
    }

    fn close_shard(&mut self) -> Result<(), PreparedError> {
        if let Some((path, file)) = self.shard.take() {
            let file = file.into_inner().map_err(|e| self.write_error(&path, e.into_error()))?;
            file.sync_all().map_err(|e| self.write_error(&path, e))?;
        }
        Ok(())
    }

    /// A full disk names the directory and what is still to be written.
    fn write_error(&self, path: &Path, e: std::io::Error) -> PreparedError {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            let needed = ((self.index.count - self.written) * self.row_bytes) as u64;
            return PreparedError::NoSpace {
                dir: self.dir.clone(),
                needed,
                available: free_bytes(&self.dir).unwrap_or(0),
            };
        }
        PreparedError::io(path, e)
    }
}

/// Bytes an unprivileged writer may still use on `dir`'s filesystem.
pub fn free_bytes(dir: &Path) -> Result<u64, PreparedError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| PreparedError::io(dir, std::io::Error::other(e)))?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a statvfs to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(PreparedError::io(dir, std::io::Error::last_os_error()));
    }
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// A prepared split, opened for reading: rows in any order (`read`), or
/// in order with prefetching (`batches`).
pub struct PreparedSet {
    dir: PathBuf,
    index: Index,
    row_bytes: usize,
    row_values: usize,
    expected: HashMap<String, FileEntry>,
    /// Each shard, opened and checked against the manifest on first use.
    shards: Vec<OnceLock<Result<File, String>>>,
}

impl PreparedSet {
    /// Opens the prepared data in `dir`, whose manifest lists `files`.
    /// Reads the index only; shards are checked as they are read.
    pub fn open(dir: &Path, files: &[FileEntry]) -> Result<Self, PreparedError> {
        let expected: HashMap<String, FileEntry> = files.iter().map(|f| (f.name.clone(), f.clone())).collect();
        let path = dir.join(INDEX);
        let bytes = std::fs::read(&path).map_err(|e| PreparedError::io(&path, e))?;
        check(&path, expected.get(INDEX), &bytes)?;
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| PreparedError::Damaged { path: path.clone(), reason: e.to_string() })?;
        let row_values = index.sample_shape.iter().product();
        Ok(Self {
            dir: dir.to_path_buf(),
            row_bytes: index.row_bytes(),
            row_values,
            shards: index.shards.iter().map(|_| OnceLock::new()).collect(),
            index,
            expected,
        })
    }

    pub fn len(&self) -> usize {
        self.index.count
    }

    pub fn is_empty(&self) -> bool {
        self.index.count == 0
    }

    /// One sample's shape.
    pub fn sample_shape(&self) -> &[usize] {
        &self.index.sample_shape
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The labels, if the source had them (checked against the manifest).
    pub fn labels(&self) -> Result<Option<Vec<i64>>, PreparedError> {
        if !self.index.labelled {
            return Ok(None);
        }
        let path = self.dir.join(LABELS);
        let bytes = std::fs::read(&path).map_err(|e| PreparedError::io(&path, e))?;
        check(&path, self.expected.get(LABELS), &bytes)?;
        let labels = ndarray_npy::ReadNpyExt::read_npy(bytes.as_slice())
            .map_err(|e: ndarray_npy::ReadNpyError| PreparedError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })
            .map(|a: ndarray::Array1<i64>| a.into_raw_vec_and_offset().0)?;
        if labels.len() != self.index.count {
            return Err(PreparedError::Damaged {
                path,
                reason: format!("{} labels for {} samples", labels.len(), self.index.count),
            });
        }
        Ok(Some(labels))
    }

    /// The samples at `indices` (any order), normalised, as one batch
    /// [indices.len(), sample_shape...]. Rows are read in parallel.
    pub fn read(&self, indices: &[usize]) -> Result<ArrayD<f32>, PreparedError> {
        let mut values = vec![0f32; indices.len() * self.row_values];
        values
            .par_chunks_mut(self.row_values.max(1))
            .zip(indices.par_iter())
            .try_for_each_init(|| vec![0u8; self.row_bytes], |bytes, (row, &index)| self.read_row(index, bytes, row))?;
        let shape = [&[indices.len()][..], &self.index.sample_shape[..]].concat();
        Ok(ArrayD::from_shape_vec(IxDyn(&shape), values).expect("values fill the shape"))
    }

    fn read_row(&self, index: usize, bytes: &mut [u8], out: &mut [f32]) -> Result<(), PreparedError> {
        assert!(index < self.index.count, "sample {index} of {}", self.index.count);
        let shard = index / self.index.rows_per_shard;
        let file = self.shard(shard)?;
        let offset = ((index % self.index.rows_per_shard) * self.row_bytes) as u64;
        file.read_exact_at(bytes, offset)
            .map_err(|e| PreparedError::io(&self.dir.join(&self.index.shards[shard]), e))?;
        self.index.dtype.decode(bytes, out);
        if let Some(normalize) = &self.index.normalize {
            normalize.apply(&self.index.sample_shape, out);
        }
        Ok(())
    }

    fn shard(&self, shard: usize) -> Result<&File, PreparedError> {
        let name = &self.index.shards[shard];
        let path = self.dir.join(name);
        self.shards[shard]
            .get_or_init(|| {
                let file = File::open(&path).map_err(|e| format!("cannot open it: {e}"))?;
                let (bytes, sha256) =
                    crate::files::hash_open_file(&file).map_err(|e| format!("cannot read it: {e}"))?;
                match self.expected.get(name) {
                    Some(entry) if entry.bytes == bytes && entry.sha256 == sha256 => Ok(file),
                    Some(entry) => Err(format!(
                        "its {bytes} bytes hash to {}, the manifest recorded {} bytes hashing to {}",
                        &sha256[..12],
                        entry.bytes,
                        &entry.sha256[..12.min(entry.sha256.len())]
                    )),
                    None => Err("the artifact's manifest does not list it".into()),
                }
            })
            .as_ref()
            .map_err(|reason| PreparedError::Damaged { path, reason: reason.clone() })
    }

    /// The whole split in order, `batch` samples at a time (the last may
    /// be short), read and normalised on another thread ahead of the caller.
    pub fn batches(self: &Arc<Self>, batch: usize) -> Batches {
        let (sender, receiver) = mpsc::sync_channel(PREFETCH);
        let set = Arc::clone(self);
        let batch = batch.max(1);
        std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                for start in (0..set.len()).step_by(batch) {
                    let indices: Vec<usize> = (start..(start + batch).min(set.len())).collect();
                    let read = set.read(&indices);
                    let failed = read.is_err();
                    // A dropped receiver means the caller stopped early.
                    if sender.send(read).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("a thread can be spawned");
        Batches { receiver }
    }
}

/// Batches in order from `PreparedSet::batches`.
pub struct Batches {
    receiver: mpsc::Receiver<Result<ArrayD<f32>, PreparedError>>,
}

impl Iterator for Batches {
    type Item = Result<ArrayD<f32>, PreparedError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.receiver.recv().ok()
    }
}

/// Checks a small file read whole against its manifest entry.
fn check(path: &Path, entry: Option<&FileEntry>, bytes: &[u8]) -> Result<(), PreparedError> {
    let sha256 = hex::encode(Sha256::digest(bytes));
    match entry {
        Some(entry) if entry.bytes == bytes.len() as u64 && entry.sha256 == sha256 => Ok(()),
        Some(_) => {
            Err(PreparedError::Damaged { path: path.to_path_buf(), reason: "it does not match its manifest".into() })
        }
        None => Err(PreparedError::Damaged {
            path: path.to_path_buf(),
            reason: "the artifact's manifest does not list it".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `count` u8 samples of 3x5x7 whose bytes depend on sample and
    /// position, sharded every `rows_per_shard`, and seals them as the
    /// store would (every file hashed into the manifest's entries).
    fn write(dir: &Path, count: usize, rows_per_shard: usize) -> Vec<FileEntry> {
        let mut writer = ShardWriter::create(dir, Stored::U8, &[3, 5, 7], count, Some(imagenet_like())).unwrap();
        writer.index.rows_per_shard = rows_per_shard;
        for sample in 0..count {
            let row: Vec<u8> = (0..105).map(|i| ((sample * 31 + i * 7) % 256) as u8).collect();
            writer.append(&row).unwrap();
        }
        let labels: Vec<i64> = (0..count as i64).map(|i| i % 10).collect();
        writer.finish(Some(&labels)).unwrap();
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                let (bytes, sha256) = crate::files::hash_file(&path).unwrap();
                FileEntry { name: path.file_name().unwrap().to_string_lossy().into(), bytes, sha256, modified_ns: None }
            })
            .collect()
    }

    fn imagenet_like() -> Normalize {
        Normalize { scale: 255.0, mean: vec![0.485, 0.456, 0.406], std: vec![0.229, 0.224, 0.225], channel_axis: 0 }
    }

    fn expected(sample: usize) -> Vec<f32> {
        let normalize = imagenet_like();
        let mut values: Vec<f32> = (0..105).map(|i| ((sample * 31 + i * 7) % 256) as f32).collect();
        normalize.apply(&[3, 5, 7], &mut values);
        values
    }

    #[test]
    fn shards_round_trip_exactly_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), 50, 8);
        let set = Arc::new(PreparedSet::open(dir.path(), &files).unwrap());
        assert_eq!(set.index().shards.len(), 7);
        assert_eq!(set.labels().unwrap().unwrap(), (0..50).map(|i| i % 10).collect::<Vec<i64>>());
        let picked = [49, 0, 17, 8, 7, 33];
        let batch = set.read(&picked).unwrap();
        for (row, &sample) in batch.outer_iter().zip(&picked) {
            assert_eq!(row.iter().copied().collect::<Vec<_>>(), expected(sample), "sample {sample}");
        }
    }

    #[test]
    fn prefetched_batches_keep_every_sample_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), 50, 8);
        let set = Arc::new(PreparedSet::open(dir.path(), &files).unwrap());
        let unprefetched = set.read(&(0..50).collect::<Vec<_>>()).unwrap();
        let mut rows = Vec::new();
        let mut sizes = Vec::new();
        for batch in set.batches(16) {
            let batch = batch.unwrap();
            sizes.push(batch.shape()[0]);
            rows.extend(batch.iter().copied());
        }
        assert_eq!(sizes, [16, 16, 16, 2]);
        assert_eq!(rows, unprefetched.iter().copied().collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_shard_is_caught_when_it_is_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), 50, 8);
        let shard = dir.path().join("shard-00003.bin");
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&shard, bytes).unwrap();
        let set = Arc::new(PreparedSet::open(dir.path(), &files).unwrap());
        // Shards before it read fine; the damaged one is named.
        assert!(set.read(&[0, 9, 23]).is_ok());
        let error = set.read(&[24]).unwrap_err().to_string();
        assert!(error.contains("shard-00003.bin is damaged"), "{error}");
        let streamed: Vec<_> = set.batches(8).collect();
        assert_eq!(streamed.len(), 4, "three good batches, then the error, then nothing");
        assert!(streamed[3].is_err());
    }

    #[test]
    fn a_full_disk_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let huge = (free_bytes(dir.path()).unwrap() / (3 * 224 * 224)) as usize + 10;
        let error = ShardWriter::create(dir.path(), Stored::U8, &[3, 224, 224], huge, None).err().unwrap();
        let message = error.to_string();
        assert!(message.contains(&dir.path().display().to_string()) && message.contains("needs"), "{message}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
