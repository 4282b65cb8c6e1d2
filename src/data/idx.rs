//! IDX files, the format of MNIST and Fashion-MNIST.
//!
//! An IDX file is a 4-byte magic (two zero bytes, a type code, the number of
//! dimensions), one big-endian u32 per dimension, then the data. Only the
//! unsigned-byte type (0x08) is used by these datasets. Debian ships the
//! files gzipped, so both forms are read.

use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum IdxError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not an unsigned-byte IDX file ({reason})")]
    Format { path: PathBuf, reason: String },
}

/// The contents of one IDX file.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file, decompressing it first if it is gzipped.
pub fn read(path: &Path) -> Result<IdxArray, IdxError> {
    let io = |source| IdxError::Io { path: path.to_path_buf(), source };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(io)?;
        out
    } else {
        raw
    };
    parse(&bytes).map_err(|reason| IdxError::Format { path: path.to_path_buf(), reason })
}

/// The dimensions an IDX file declares, from its header alone (for
/// validation, which must not read a split to learn its shape). The
/// data's length is checked when the file is read.
pub fn dims(path: &Path) -> Result<Vec<usize>, IdxError> {
    let io = |source| IdxError::Io { path: path.to_path_buf(), source };
    let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let gzipped = std::io::BufRead::fill_buf(&mut file).map_err(io)?.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> = if gzipped { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut header = vec![0u8; 4];
    reader.read_exact(&mut header).map_err(io)?;
    header.resize(4 + 4 * header[3] as usize, 0);
    reader.read_exact(&mut header[4..]).map_err(io)?;
    let (dims, _) = parse_header(&header).map_err(|reason| IdxError::Format { path: path.to_path_buf(), reason })?;
    Ok(dims)
}

/// The dimensions and the header's length.
fn parse_header(bytes: &[u8]) -> Result<(Vec<usize>, usize), String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("bad magic number".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!("element type 0x{:02x}, expected 0x08 (unsigned byte)", bytes[2]));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err("truncated header".into());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    Ok((dims, header))
}

fn parse(bytes: &[u8]) -> Result<IdxArray, String> {
    let (dims, header) = parse_header(bytes)?;
    let count: usize = dims.iter().product();
    let data = &bytes[header..];
    if data.len() != count {
        return Err(format!("header promises {count} values but the file holds {}", data.len()));
    }
    Ok(IdxArray { dims, data: data.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_header_and_data() {
        let array = parse(&encode(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(array.dims, [2, 3]);
        assert_eq!(array.data, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_truncated_and_foreign_files() {
        assert!(parse(&encode(&[2, 3], &[1, 2, 3])).unwrap_err().contains("promises 6"));
        assert!(parse(b"PK\x03\x04rest").unwrap_err().contains("magic"));
        let mut float = encode(&[1], &[0, 0, 0, 0]);
        float[2] = 0x0d;
        assert!(parse(&float).unwrap_err().contains("0x0d"));
    }
}
