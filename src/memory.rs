//! What the machine can hold: every large buffer's size is computed (with
//! checked arithmetic) and compared with the available memory before it is
//! allocated, so an impossible request is a typed error, not an abort or the
//! OOM killer.

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::ModelConfig;
use crate::error::{MoeError, Result};

/// A cap on what [`ensure_fits`] lets through, below the machine's memory
/// (0: none). Set by fuzz targets, so that anything the checks let through
/// stays under the fuzzer's allocation limit and any allocation above that
/// limit is one no check accounted for.
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Caps the memory [`ensure_fits`] considers available at `bytes` (`None`:
/// the machine's `MemAvailable` only), for the whole process.
pub fn set_limit(bytes: Option<u64>) {
    LIMIT.store(bytes.unwrap_or(0), Ordering::Relaxed);
}

/// What [`ensure_fits`] compares needs with: [`available`], capped by
/// [`set_limit`].
pub fn budget() -> Option<u64> {
    match (LIMIT.load(Ordering::Relaxed), available()) {
        (0, available) => available,
        (limit, Some(available)) => Some(limit.min(available)),
        (limit, None) => Some(limit),
    }
}

/// Bytes the kernel says can be allocated without swapping (`MemAvailable`
/// of `/proc/meminfo`), read once per process; `None` where it is unknown.
pub fn available() -> Option<u64> {
    static AVAILABLE: OnceLock<Option<u64>> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        parse_mem_available(&text)
    })
}

/// The `MemAvailable:  N kB` line of a `/proc/meminfo` text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Refuses a need of `need` bytes (`None`: the size overflowed) that exceeds
/// the available memory, naming what it is for and, in `hint`, how to run it
/// anyway. Allocates nothing unless it fails.
pub fn ensure_fits(
    what: impl FnOnce() -> String,
    need: Option<u64>,
    hint: &'static str,
) -> Result<()> {
    check(what, need, budget(), hint)
}

/// The one memory check of every path that builds a model — a fresh one
/// (`Model::new`, hence `moe init` and the shape flags of `moe train`), one
/// from given parameters, one read from files (our checkpoints, Hugging Face
/// directories, a resumable run) — run before any part of it is allocated:
/// the model itself ([`ModelConfig::model_bytes`]: weights, RoPE tables,
/// per-tensor bookkeeping), `weight_copies` more weight-sized buffers (a
/// loader's staging copy, a run's moments and gradients) and `files` bytes
/// of files read whole. `config` must be valid ([`ModelConfig::validate`]).
pub fn ensure_model_fits(config: &ModelConfig, weight_copies: u64, files: u64) -> Result<()> {
    let need = config
        .weight_bytes()
        .checked_mul(weight_copies)
        .and_then(|copies| copies.checked_add(config.model_bytes()))
        .and_then(|model| model.checked_add(files));
    ensure_fits(
        || format!("a model of {} parameters", config.param_count()),
        need,
        " (training needs 4× the weights: gradients and two AdamW moments)",
    )
}

/// The length of the file at `path`, read from its metadata (nothing is
/// read or allocated).
pub fn file_len(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| MoeError::io(path, e))
}

/// Reads a whole file after checking that its length fits in memory: a file
/// larger than the machine's memory is a typed error, not an abort.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let len = file_len(path)?;
    ensure_fits(|| format!("reading {}", path.display()), Some(len), "")?;
    std::fs::read(path).map_err(|e| MoeError::io(path, e))
}

/// [`read_file`] for a text file (UTF-8).
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_file(path)?).map_err(|_| {
        MoeError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        )
    })
}

/// [`ensure_fits`] against a given amount of memory (`None`: unknown, so
/// only an overflowing size is refused).
fn check(
    what: impl FnOnce() -> String,
    need: Option<u64>,
    available: Option<u64>,
    hint: &'static str,
) -> Result<()> {
    match (need, available) {
        (Some(need), Some(available)) if need <= available => Ok(()),
        (Some(_), None) => Ok(()),
        (need, available) => Err(MoeError::OutOfMemory {
            what: what(),
            need: need.unwrap_or(u64::MAX),
            available: available.unwrap_or(0),
            hint,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   21000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(21_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 3 kB\n"), None);
    }

    #[test]
    fn a_need_beyond_the_available_memory_is_named_in_the_error() {
        let what = || "default_6_9b weights".to_string();
        assert!(check(what, Some(10), Some(10), "").is_ok());
        assert!(check(what, Some(10), None, "").is_ok());
        let err = check(what, Some(27_530_714_112), Some(8_000_000_000), "; try X").unwrap_err();
        assert_eq!(
            err.to_string(),
            "default_6_9b weights needs 27.5 GB; 8.0 GB available; try X"
        );
        assert!(matches!(
            check(what, None, None, ""),
            Err(MoeError::OutOfMemory { need: u64::MAX, .. })
        ));
    }
}
