//! Training text: the built-in corpora, the train/validation split, and seeded
//! random windows.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::error::{MoeError, Result};
use crate::tokenizer::Tokenizer;

/// Tiny Shakespeare (40,000 lines of the plays, 1,115,394 bytes of ASCII;
/// public domain), from `data/tinyshakespeare.txt`, compiled into the binary:
/// what `moe train` trains on by default, with no download.
pub const SHAKESPEARE: &str = include_str!("../data/tinyshakespeare.txt");

/// This project's README, documentation and source, gathered by `build.rs`
/// and compiled into the binary (more than 50 KB of text): `moe train
/// --corpus source`.
pub const SOURCE_CORPUS: &str = include_str!(concat!(env!("OUT_DIR"), "/corpus.txt"));

/// The corpora compiled into the binary, by the name `moe train --corpus`
/// gives them: `shakespeare` (the default) and `source`.
pub const BUILTIN_CORPORA: [(&str, &str); 2] =
    [("shakespeare", SHAKESPEARE), ("source", SOURCE_CORPUS)];

/// The built-in corpus called `name`.
pub fn builtin_corpus(name: &str) -> Option<&'static str> {
    BUILTIN_CORPORA
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// Fraction of the tokens used for training; the rest is validation.
pub const TRAIN_FRACTION: f64 = 0.9;

/// A text's tokens split 90/10: the first ⌊0.9·n⌋ train, the rest validate.
pub fn split(tokens: &[u32]) -> (&[u32], &[u32]) {
    tokens.split_at((tokens.len() as f64 * TRAIN_FRACTION) as usize)
}

/// A tokenized text split 90/10 into training and validation tokens.
#[derive(Debug, Clone)]
pub struct TextData {
    /// The first 90 % of the tokens.
    pub train: Vec<u32>,
    /// The last 10 %.
    pub val: Vec<u32>,
    /// Bytes of text the validation tokens stand for (for bits per byte).
    pub val_bytes: usize,
    /// FNV-1a hash of the text, to recognise the same data on resume.
    pub fingerprint: String,
}

impl TextData {
    /// Tokenizes `text` and splits it; each split must hold at least one
    /// window of `seq + 1` tokens.
    pub fn new(text: &[u8], tokenizer: &Tokenizer, seq: usize) -> Result<Self> {
        if text.is_empty() {
            return Err(MoeError::EmptyInput("training text"));
        }
        let tokens = tokenizer.encode(text)?;
        let (train, val) = split(&tokens);
        let (train, val) = (train.to_vec(), val.to_vec());
        for (what, split) in [("training split", &train), ("validation split", &val)] {
            if split.len() < seq + 1 {
                return Err(MoeError::DataTooSmall {
                    what,
                    tokens: split.len(),
                    needed: seq + 1,
                });
            }
        }
        let val_bytes = val.iter().map(|&t| tokenizer.token_bytes(t).len()).sum();
        Ok(TextData {
            train,
            val,
            val_bytes,
            fingerprint: format!("{:016x}", crate::params::fnv1a(text)),
        })
    }
}

/// Evenly spaced windows of `tokens` as at most `max_batches` batches of B × S:
/// the same batches every time, so evaluations are comparable.
pub fn evenly_spaced_batches(
    tokens: &[u32],
    batch: usize,
    seq: usize,
    max_batches: usize,
) -> Result<Vec<Batch>> {
    if tokens.len() < seq + 1 {
        return Err(MoeError::DataTooSmall {
            what: "evaluation split",
            tokens: tokens.len(),
            needed: seq + 1,
        });
    }
    let windows = ((tokens.len() - 1) / seq).max(1);
    let count = (windows / batch.max(1)).clamp(1, max_batches.max(1));
    let stride = (tokens.len() - seq - 1) as f64 / (count * batch).max(1) as f64;
    (0..count)
        .map(|i| {
            let starts = (0..batch).map(|j| ((i * batch + j) as f64 * stride) as usize);
            window_batch(tokens, starts, seq)
        })
        .collect()
}

/// A batch of windows starting at `starts`: ids = tokens[s..s+S], targets = tokens[s+1..s+S+1].
fn window_batch(tokens: &[u32], starts: impl Iterator<Item = usize>, seq: usize) -> Result<Batch> {
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    let mut rows = 0;
    for s in starts {
        ids.extend_from_slice(&tokens[s..s + seq]);
        targets.extend_from_slice(&tokens[s + 1..s + seq + 1]);
        rows += 1;
    }
    Batch::new(ids, targets, rows)
}

/// The position of a ChaCha random stream, enough to continue it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The seed the stream started from.
    pub seed: u64,
    /// The stream number.
    pub stream: u64,
    /// Words consumed so far (as a decimal string: JSON numbers cannot hold u128).
    #[serde(with = "u128_string")]
    pub word_pos: u128,
}

mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// Draws training batches of random contiguous windows from a seeded stream.
#[derive(Debug, Clone)]
pub struct WindowSampler {
    rng: ChaCha8Rng,
    seed: u64,
}

impl WindowSampler {
    /// A sampler whose windows depend only on `seed`.
    pub fn new(seed: u64) -> Self {
        WindowSampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
            seed,
        }
    }

    /// A sampler continuing exactly where `state` left off.
    pub fn resume(state: RngState) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(state.seed);
        rng.set_stream(state.stream);
        rng.set_word_pos(state.word_pos);
        WindowSampler {
            rng,
            seed: state.seed,
        }
    }

    /// Where the stream is now.
    pub fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            stream: self.rng.get_stream(),
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// Overwrites `batch` (B rows of S) with random windows of `tokens`.
    pub fn fill(&mut self, batch: &mut Batch, tokens: &[u32]) {
        let seq = batch.seq_len;
        for row in 0..batch.batch_size {
            let start = self.rng.random_range(0..tokens.len() - seq);
            batch.ids[row * seq..(row + 1) * seq].copy_from_slice(&tokens[start..start + seq]);
            batch.targets[row * seq..(row + 1) * seq]
                .copy_from_slice(&tokens[start + 1..start + seq + 1]);
        }
    }
}

/// What `state.json` records about a run's data, to resume it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataState {
    /// Where the text came from: a path, or `built-in:NAME` for a built-in
    /// corpus (plain `built-in`, from before Tiny Shakespeare shipped, is
    /// `built-in:source`).
    pub source: String,
    /// [`TextData::fingerprint`] of the text.
    pub fingerprint: String,
    /// Batch size B.
    pub batch_size: usize,
    /// Window length S.
    pub seq_len: usize,
    /// The window sampler's position.
    pub rng: RngState,
    /// The training clock of a run given a time budget (`moe train --time`);
    /// absent for a run counted in steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<RunClock>,
}

/// A time-budgeted run's training clock at its checkpoint (see
/// [`crate::budget`] for what the clock counts).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunClock {
    /// Seconds of training clock the whole run may use.
    pub budget_secs: f64,
    /// Seconds used up to the checkpoint.
    pub elapsed_secs: f64,
}
