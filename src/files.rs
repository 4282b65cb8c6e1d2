//! Paths a user names are read only if they are regular files: opening a
//! FIFO blocks until something writes to it, so `qsweep validate` would
//! hang with no message, and a directory, device or socket is never a
//! model or a tensor file.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

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
