//! Files as qsweep trusts them.
//!
//! Paths a user names are read only if they are regular files: opening a
//! FIFO blocks until something writes to it, so `qsweep validate` would
//! hang with no message, and a directory, device or socket is never a
//! model or a tensor file.
//!
//! A file's identity is its size, SHA-256 and modification time
//! (`FileEntry`): what artifacts record and what prepared data is checked
//! against, kept here, below both, so that neither depends on the other.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Ok if `path` is a regular file (after following links); otherwise an
/// error that says what it is instead.
pub fn regular_file(path: &Path) -> io::Result<()> {
    let kind = std::fs::metadata(path)?.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe), which would block reading"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("it is {what}, not a regular file")))
}

/// One file of an artifact, as recorded when it was completed (and as
/// prepared data checks its shards against).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
    /// The file's mtime (ns since the epoch) when it was sealed. A file
    /// whose size and mtime are unchanged is taken as intact without being
    /// re-read (as git's index does), so checking a cache of many GB stays
    /// cheap; stages still check what they read (`ResultsDir::checked_input`,
    /// `data::prepared`). Any other file is hashed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_ns: Option<u64>,
}

impl FileEntry {
    /// Whether the file at `path` is what this entry recorded, re-hashing
    /// it only if its size or mtime changed.
    pub fn matches(&self, path: &Path) -> bool {
        let Ok(meta) = fs::metadata(path) else { return false };
        if meta.len() != self.bytes {
            return false;
        }
        if self.modified_ns.is_some() && self.modified_ns == modified_ns(&meta) {
            return true;
        }
        self.hashes_to_it(path)
    }

    /// Whether the file at `path` hashes to this entry.
    pub fn hashes_to_it(&self, path: &Path) -> bool {
        hash_file(path).is_ok_and(|(bytes, sha)| bytes == self.bytes && sha == self.sha256)
    }
}

/// A file's modification time in ns since the epoch, as `FileEntry` records it.
pub fn modified_ns(meta: &fs::Metadata) -> Option<u64> {
    let since = meta.modified().ok()?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_nanos()).ok()
}

/// Size and hex SHA-256 of a file.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    hash_open_file(&fs::File::open(path)?)
}

/// Size and SHA-256 of an open file, read from where it stands; for a
/// reader that keeps the file open after checking it.
pub fn hash_open_file(file: &fs::File) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, file), &mut hasher)?;
    Ok((bytes, hex::encode(hasher.finalize())))
}
