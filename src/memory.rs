//! What the machine can hold: every large buffer's size is computed (with
//! checked arithmetic) and compared with the available memory before it is
//! allocated, so an impossible request is a typed error, not an abort or the
//! OOM killer.

use std::sync::OnceLock;

use crate::error::{MoeError, Result};

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
    check(what, need, available(), hint)
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
