//! NumPy `.npy` files, through the ndarray-npy crate: written whole or a
//! block of rows at a time, and read whole or a batch at a time.

use std::io::Write;
use std::path::Path;

use ndarray::{ArrayD, ArrayViewD};

/// Reads a float32 `.npy` of shape [N, ...] a batch of rows at a time, so
/// memory holds one batch rather than the whole file.
pub struct NpyBatches {
    reader: std::io::BufReader<std::fs::File>,
    path: std::path::PathBuf,
    shape: Vec<usize>,
    remaining: usize,
    batch: usize,
}

impl NpyBatches {
    pub fn open(path: &Path, batch: usize) -> std::io::Result<Self> {
        let bad = |what: String| std::io::Error::other(format!("{}: {what}", path.display()));
        let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
        let header = ndarray_npy::npy::header::Header::from_reader(&mut reader).map_err(|e| bad(e.to_string()))?;
        if header.type_descriptor.to_string() != "'<f4'" || header.layout.is_fortran() || header.shape.is_empty() {
            return Err(bad(format!("expected a C-ordered little-endian float32 array, found {header}")));
        }
        let remaining = header.shape[0];
        Ok(Self { reader, path: path.to_path_buf(), shape: header.shape, remaining, batch: batch.max(1) })
    }

    /// The whole array's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl Iterator for NpyBatches {
    type Item = std::io::Result<ArrayD<f32>>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::Read;
        if self.remaining == 0 {
            return None;
        }
        let rows = self.batch.min(self.remaining);
        self.remaining -= rows;
        let row_len: usize = self.shape[1..].iter().product();
        let mut bytes = vec![0u8; rows * row_len * 4];
        if let Err(e) = self.reader.read_exact(&mut bytes) {
            return Some(Err(std::io::Error::other(format!("{}: {e}", self.path.display()))));
        }
        let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let mut shape = self.shape.clone();
        shape[0] = rows;
        Some(ArrayD::from_shape_vec(shape, values).map_err(std::io::Error::other))
    }
}

/// Writes a `.npy` file.
pub fn write_npy<T: ndarray_npy::WritableElement>(path: &Path, array: &ArrayViewD<'_, T>) -> std::io::Result<()> {
    ndarray_npy::write_npy(path, array).map_err(std::io::Error::other)
}

/// A `.npy` file of f32 written a block of rows at a time, so that a
/// split is never held in memory whole: the file is laid out zeroed at its
/// final shape (ndarray-npy's header), then filled in order.
pub struct NpyRowWriter {
    file: std::io::BufWriter<std::fs::File>,
    row_len: usize,
    rows: usize,
    written: usize,
}

impl NpyRowWriter {
    /// `shape[0]` rows of `shape[1..]` each.
    pub fn create(path: &Path, shape: &[usize]) -> std::io::Result<Self> {
        use std::io::Seek;
        let mut file = std::fs::File::create(path)?;
        ndarray_npy::write_zeroed_npy::<f32, _>(&file, shape.to_vec()).map_err(std::io::Error::other)?;
        let (rows, row_len) = (shape[0], shape[1..].iter().product::<usize>());
        let data_start = file.metadata()?.len() - (rows * row_len * 4) as u64;
        file.seek(std::io::SeekFrom::Start(data_start))?;
        Ok(Self { file: std::io::BufWriter::new(file), row_len, rows, written: 0 })
    }

    /// Appends whole rows.
    pub fn append(&mut self, values: &[f32]) -> std::io::Result<()> {
        assert_eq!(values.len() % self.row_len, 0, "whole rows only");
        self.written += values.len() / self.row_len;
        assert!(self.written <= self.rows, "more rows than the file was made for");
        for value in values {
            self.file.write_all(&value.to_le_bytes())?;
        }
        Ok(())
    }

    /// Flushes and checks that every row was written.
    pub fn finish(self) -> std::io::Result<()> {
        if self.written != self.rows {
            return Err(std::io::Error::other(format!("{} of {} rows written", self.written, self.rows)));
        }
        self.file.into_inner().map_err(|e| e.into_error())?.sync_all()
    }
}

/// Reads a `.npy` file of any rank.
pub fn read_npy<T: ndarray_npy::ReadableElement>(path: &Path) -> std::io::Result<ArrayD<T>> {
    ndarray_npy::read_npy(path).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, IxDyn};

    #[test]
    fn rows_written_in_blocks_read_back_as_one_array() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.npy");
        let mut writer = NpyRowWriter::create(&path, &[3, 1, 2]).unwrap();
        writer.append(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        writer.append(&[5.0, 6.0]).unwrap();
        writer.finish().unwrap();
        let read = read_npy::<f32>(&path).unwrap();
        assert_eq!(read.shape(), [3, 1, 2]);
        assert_eq!(read.iter().copied().collect::<Vec<_>>(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    /// Batches cover every row once, in order, with a ragged last batch.
    #[test]
    fn npy_streams_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let array = Array::from_shape_fn(IxDyn(&[5, 1, 2, 2]), |i| (i[0] * 4 + i[2] * 2 + i[3]) as f32);
        write_npy(&path, &array.view()).unwrap();
        let batches: Vec<ArrayD<f32>> = NpyBatches::open(&path, 2).unwrap().map(Result::unwrap).collect();
        assert_eq!(batches.iter().map(|b| b.shape()[0]).collect::<Vec<_>>(), [2, 2, 1]);
        let joined: Vec<f32> = batches.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(joined, array.iter().copied().collect::<Vec<_>>());
    }

    #[test]
    fn npy_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let array = Array::from_shape_fn(IxDyn(&[2, 3]), |i| (i[0] * 3 + i[1]) as f32);
        write_npy(&path, &array.view()).unwrap();
        assert_eq!(read_npy::<f32>(&path).unwrap(), array);
    }
}
