//! A batch of training sequences: token ids and next-token targets, and
//! its JSON form (the input of `moe dump` and of the reference).

use crate::error::{MoeError, Result};

/// A batch of token ids and next-token targets, both [B, S], row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Input ids [B·S].
    pub ids: Vec<u32>,
    /// Target ids [B·S].
    pub targets: Vec<u32>,
    /// B.
    pub batch_size: usize,
    /// S.
    pub seq_len: usize,
}

impl Batch {
    /// A batch from flat ids and targets; `ids.len()` must be a positive
    /// multiple of `batch_size` and equal `targets.len()`.
    pub fn new(ids: Vec<u32>, targets: Vec<u32>, batch_size: usize) -> Result<Self> {
        if ids.is_empty() || batch_size == 0 {
            return Err(MoeError::EmptyInput("batch"));
        }
        if !ids.len().is_multiple_of(batch_size) {
            return Err(MoeError::shape(
                "batch ids",
                format!("a multiple of batch size {batch_size}"),
                ids.len(),
            ));
        }
        if targets.len() != ids.len() {
            return Err(MoeError::shape("batch targets", ids.len(), targets.len()));
        }
        let seq_len = ids.len() / batch_size;
        Ok(Batch {
            ids,
            targets,
            batch_size,
            seq_len,
        })
    }

    /// A batch from equal-length rows.
    pub fn from_rows(ids: &[Vec<u32>], targets: &[Vec<u32>]) -> Result<Self> {
        let seq = ids.first().map_or(0, Vec::len);
        if ids.len() != targets.len() {
            return Err(MoeError::shape("batch rows", ids.len(), targets.len()));
        }
        for (b, (i, t)) in ids.iter().zip(targets).enumerate() {
            if i.len() != seq || t.len() != seq {
                return Err(MoeError::shape(
                    format!("batch row {b}"),
                    seq,
                    format!("{} ids and {} targets", i.len(), t.len()),
                ));
            }
        }
        Batch::new(ids.concat(), targets.concat(), ids.len())
    }

    /// Number of tokens, B·S.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// A batch from JSON `{"ids": [[...]], "targets": [[...]]}` (rows of equal length).
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_json_at(text, std::path::Path::new("<batch>"))
    }

    /// [`Batch::from_json`], naming `path` in errors.
    pub fn from_json_at(text: &str, path: &std::path::Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Rows {
            ids: Vec<Vec<u32>>,
            targets: Vec<Vec<u32>>,
        }
        let rows: Rows = crate::error::parse_json(text, path)?;
        Batch::from_rows(&rows.ids, &rows.targets)
    }

    /// A batch from a JSON file (see [`Batch::from_json`]).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        Self::from_json_at(&crate::memory::read_text(path)?, path)
    }
}
