//! Durable file writes: a file is replaced whole or not at all, and what is
//! written survives a crash once the call returns.
//!
//! The checkpoint, the tokenizer and the command line's reports all write
//! through here; this module depends on nothing else in the crate.

use std::fs::{File, Permissions};
use std::io::Write as _;
use std::path::Path;

use crate::error::{MoeError, Result};

/// Writes `bytes` to `path` via a temporary file in the same directory, synced
/// and then renamed over `path`: readers see the old file or the new, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    let mut tmp = tempfile::Builder::new()
        .permissions(readable_by_all())
        .tempfile_in(dir)
        .map_err(|e| MoeError::io(dir, e))?;
    tmp.write_all(bytes)
        .map_err(|e| MoeError::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| MoeError::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| MoeError::io(path, e.error))?;
    sync_dir(dir)
}

/// Flushes a file already written (e.g. by another library) to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| MoeError::io(path, e))
}

/// Flushes a directory's entries (creations, renames) to the disk, so a rename
/// that returned is not undone by a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| MoeError::io(dir, e))
}

/// rw-r--r--: checkpoints and reports are data to share, like any file `cp`
/// would write.
pub fn readable_by_all() -> Permissions {
    use std::os::unix::fs::PermissionsExt;
    Permissions::from_mode(0o644)
}

/// The directory `path` lives in ("." for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}
