//! The one error type of the crate: every public entry point returns
//! `Result<T, MoeError>`, and nothing panics on user input (CONTRACT §8).

use std::path::{Path, PathBuf};

/// Everything that can go wrong when building, running, training, saving or
/// loading a model. Each variant names the problem precisely enough to fix it.
#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid config: {0}")]
    InvalidConfig(String),

    /// A batch, prompt or text with nothing in it.
    #[error("empty input: {0}")]
    EmptyInput(&'static str),

    /// A token (or target) id that the vocabulary does not have.
    #[error("{what} id {id} at position {position} is out of range for vocab_size {vocab_size}")]
    TokenOutOfRange {
        /// "token" or "target".
        what: &'static str,
        /// The offending id.
        id: u32,
        /// Flat index of the offending id in its input.
        position: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },

    /// A sequence (or a cache that would grow) beyond `max_seq_len`.
    #[error("sequence of length {len} exceeds max_seq_len {max}")]
    SequenceTooLong {
        /// The length asked for.
        len: usize,
        /// The configured maximum.
        max: usize,
    },

    /// Two inputs whose sizes must agree do not.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which input.
        what: String,
        /// What was expected, in words or numbers.
        expected: String,
        /// What was given.
        got: String,
    },

    /// Text too short to cut even one training window from.
    #[error(
        "{what} has {tokens} tokens; one window needs {needed} (use more text or a smaller --seq)"
    )]
    DataTooSmall {
        /// Which part of the data.
        what: &'static str,
        /// Tokens it has.
        tokens: usize,
        /// Tokens one window needs (S + 1).
        needed: usize,
    },

    /// A sampling parameter out of its range (t < 0, p ∉ (0, 1], k > V).
    #[error("invalid sampling parameter: {0}")]
    InvalidSampling(String),

    /// A training hyper-parameter out of its range.
    #[error("invalid training setting: {0}")]
    InvalidTraining(String),

    /// The loss, a gradient or the updated weights or moments were NaN or
    /// infinite; the step was refused and weights and moments were left untouched.
    #[error(
        "non-finite {what} at step {step}: the step was refused, weights and moments are unchanged (lower the learning rate?)"
    )]
    NonFinite {
        /// "loss", "gradient", "weights" or "moments".
        what: &'static str,
        /// The step number that was refused.
        step: u64,
    },

    /// A step's cross-entropy broke the divergence rule (above
    /// `train::DIVERGENCE_FACTOR`·ln V); the step was refused and not saved.
    #[error(
        "training diverged at step {step}: cross-entropy {ce:.3} > {limit:.3} nats (4·ln V, four times a uniform guess's); the step was refused and nothing was saved (lower the learning rate?)"
    )]
    Diverged {
        /// The step number that was refused.
        step: u64,
        /// Its cross-entropy (nats/token).
        ce: f32,
        /// The rule's limit for this vocabulary.
        limit: f32,
    },

    /// A computation outside training produced NaN or infinity (e.g. the
    /// logits of a diverged model).
    #[error("non-finite {what}: the model has diverged (NaN or infinite values)")]
    NonFiniteValue {
        /// What was non-finite: "loss" or "logits".
        what: &'static str,
    },

    /// Cases of the numerical stability report failed.
    #[error("{failed} of {total} stability cases failed (see the report)")]
    StabilityFailed {
        /// Cases that failed.
        failed: usize,
        /// Cases run.
        total: usize,
    },

    /// More memory than the machine has available.
    #[error("{what} needs {} GB; {} GB available{hint}", gb(*need), gb(*available))]
    OutOfMemory {
        /// What the memory is for.
        what: String,
        /// Bytes needed.
        need: u64,
        /// Bytes available (MemAvailable).
        available: u64,
        /// How to run it anyway, or "".
        hint: &'static str,
    },

    /// A checkpoint that cannot be read, is truncated or corrupt, or does not
    /// match the model it is loaded into.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A Hugging Face model feature our model cannot represent (sliding-window
    /// attention, biases, RoPE scaling, tied embeddings, …).
    #[error("{path}: `{field}` = {value} cannot be represented: {reason}")]
    HfUnsupported {
        /// The file concerned.
        path: PathBuf,
        /// The config field or tensor name.
        field: String,
        /// Its value, as JSON (or a description).
        value: String,
        /// What our model does instead.
        reason: String,
    },

    /// Another process holds the writer's lock on a run directory.
    #[error(
        "{path} is in use by another `moe train` (it holds {path}/{LOCK_FILE}); wait for it to finish or write elsewhere"
    )]
    DirectoryBusy {
        /// The run directory.
        path: PathBuf,
    },

    /// A file that is not JSON at all: the syntax error and where it is.
    #[error("{path}: not valid JSON: {reason} (line {line}, column {column})")]
    JsonSyntax {
        /// The file concerned (or "<string>").
        path: PathBuf,
        /// The parser's message, without its position.
        reason: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },

    /// A JSON document (config, batch, training settings) that is valid JSON
    /// but not of the expected form (unknown or missing key, wrong type).
    #[error("{path}: {reason}")]
    Json {
        /// The file concerned (or "<string>").
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },

    /// `MOE_SIMD` names no level, or one this CPU cannot run.
    #[error(transparent)]
    SimdLevel(#[from] crate::kernels::SimdLevelError),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// The advisory lock file of a run directory (see `checkpoint::lock`).
pub const LOCK_FILE: &str = ".lock";

/// Parses JSON text into `T` in two passes: first as any JSON at all, so a
/// syntax error is reported as [`MoeError::JsonSyntax`] with its line and
/// column (not as whatever key the typed parse meets first), then as `T`,
/// whose complaints are [`MoeError::Json`]. `path` names the file in errors.
pub fn parse_json<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    check_json_syntax(text, path)?;
    serde_json::from_str(text).map_err(|e| MoeError::Json {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// [`MoeError::JsonSyntax`] unless `text` is one well-formed JSON value
/// (checked without building it: nothing is allocated per value).
pub fn check_json_syntax(text: &str, path: &Path) -> Result<()> {
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => Ok(()),
        Err(e) => {
            let (line, column) = (e.line(), e.column());
            let full = e.to_string();
            let reason = full
                .strip_suffix(&format!(" at line {line} column {column}"))
                .unwrap_or(&full)
                .to_string();
            Err(MoeError::JsonSyntax {
                path: path.into(),
                reason,
                line,
                column,
            })
        }
    }
}

/// Bytes as decimal gigabytes with one decimal ("27.5").
fn gb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e9)
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, MoeError>;

impl MoeError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MoeError::Io {
            path: path.into(),
            source,
        }
    }

    /// A checkpoint error for `path` with a reason.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        MoeError::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A shape mismatch with its three parts.
    pub fn shape(what: impl Into<String>, expected: impl ToString, got: impl ToString) -> Self {
        MoeError::ShapeMismatch {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}
