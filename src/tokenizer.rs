//! Byte-level BPE tokenizer, trained with the HF `tokenizers` crate.
//!
//! Text is split and merged by a standard GPT-2-style byte-level BPE, so every
//! token is a sequence of bytes. Encoding accepts any bytes: valid UTF-8 runs
//! go through the BPE, and each byte of an invalid run becomes its single-byte
//! token (all 256 are in the vocabulary). Decoding concatenates the tokens'
//! bytes, so encode → decode returns the original bytes exactly.

use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{NormalizerWrapper, TokenizerBuilder};

use crate::error::{MoeError, Result};

/// A trained byte-level BPE vocabulary.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Bytes of every token id.
    token_bytes: Vec<Vec<u8>>,
    /// Id of each single-byte token.
    byte_token: [u32; 256],
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer {{ vocab_size: {} }}", self.vocab_size())
    }
}

/// The fewest tokens a byte-level vocabulary can have: one per byte value.
pub const MIN_VOCAB: usize = 256;

impl Tokenizer {
    /// Trains a vocabulary of at most `vocab_size` tokens (≥ 256) on `text`.
    /// Bytes that are not UTF-8 are replaced by U+FFFD for training only.
    pub fn train(text: &[u8], vocab_size: usize) -> Result<Self> {
        if vocab_size < MIN_VOCAB {
            return Err(MoeError::InvalidConfig(format!(
                "vocab_size {vocab_size} is too small for a byte-level tokenizer (needs ≥ {MIN_VOCAB})"
            )));
        }
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut builder =
            TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
                .with_model(BPE::default())
                .with_pre_tokenizer(Some(ByteLevel::new(false, false, true)))
                .with_decoder(Some(ByteLevel::default()))
                .build()
                .map_err(|e| MoeError::InvalidConfig(format!("tokenizer: {e}")))?;
        let text = String::from_utf8_lossy(text);
        builder
            .train(&mut trainer, text.split_inclusive('\n'))
            .map_err(|e| MoeError::InvalidConfig(format!("tokenizer training failed: {e}")))?;
        Self::from_inner(builder.into())
    }

    /// Reads a `tokenizer.json` written by [`Tokenizer::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::memory::read_file(path).map_err(|e| match e {
            MoeError::Io { source, .. } => {
                MoeError::checkpoint(path, format!("unreadable tokenizer: {source}"))
            }
            other => other,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// A tokenizer from the bytes of a `tokenizer.json` (`path` names it in
    /// errors): a syntax error is [`MoeError::JsonSyntax`].
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad =
            |reason: String| MoeError::checkpoint(path, format!("unreadable tokenizer: {reason}"));
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        // `tokenizers` panics on some malformed JSON (an unwrap in its decoder
        // visitor): reject what is not JSON first, and contain any panic left.
        crate::error::check_json_syntax(text, path)?;
        check_pre_tokenizer(text).map_err(bad)?;
        let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| bad("malformed tokenizer JSON".into()))?;
        let inner = parsed.map_err(|e| bad(e.to_string()))?;
        Self::from_inner(inner).map_err(|e| MoeError::checkpoint(path, e.to_string()))
    }

    /// Writes `tokenizer.json` (the HF format), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| MoeError::checkpoint(path, format!("cannot serialise tokenizer: {e}")))?;
        crate::atomic_write::write_atomic(path, json.as_bytes())
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        let to_byte = unicode_to_byte();
        let vocab = inner.get_vocab(false);
        let mut token_bytes = vec![Vec::new(); vocab.len()];
        let mut given = vec![false; vocab.len()];
        for (token, &id) in &vocab {
            let slot = token_bytes.get_mut(id as usize).ok_or_else(|| {
                MoeError::InvalidConfig(format!("token id {id} beyond the vocabulary"))
            })?;
            // Two tokens of one id would decode one as the other (found by
            // the tokenizer fuzz target): encode → decode must give the bytes back.
            if std::mem::replace(&mut given[id as usize], true) {
                return Err(MoeError::InvalidConfig(format!(
                    "token id {id} is given to two tokens"
                )));
            }
            *slot = token
                .chars()
                .map(|c| {
                    to_byte(c).ok_or_else(|| {
                        MoeError::InvalidConfig(format!("token {token:?} is not byte-level"))
                    })
                })
                .collect::<Result<_>>()?;
        }
        let mut byte_token = [0u32; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            let c = byte_to_unicode(b as u8).to_string();
            *slot = inner
                .token_to_id(&c)
                .ok_or_else(|| MoeError::InvalidConfig(format!("byte {b:#04x} has no token")))?;
        }
        let tokenizer = Tokenizer {
            inner,
            token_bytes,
            byte_token,
        };
        tokenizer.check_round_trip()?;
        Ok(tokenizer)
    }

    /// encode → decode must give back every byte: a setting that adds,
    /// drops or changes text (a prefix space, a normaliser) would make the
    /// model see, and generation print, other text than it was given.
    fn check_round_trip(&self) -> Result<()> {
        let mut probe = b"the quick brown fox\n  jumps\tover \xc3\xa9t\xc3\xa9 ".to_vec();
        probe.extend(0..=255u8);
        let back = self.decode(&self.encode(&probe)?);
        if back != probe {
            // Where the two first differ, with a little context.
            let at = probe.iter().zip(&back).take_while(|(a, b)| a == b).count();
            let from = at.saturating_sub(4);
            let show = |bytes: &[u8]| {
                format!(
                    "{:?}",
                    String::from_utf8_lossy(&bytes[from..bytes.len().min(at + 8)])
                )
            };
            return Err(MoeError::InvalidConfig(format!(
                "encoding then decoding changes the text (at byte {at}, {} comes back as {})",
                show(&probe),
                show(&back)
            )));
        }
        Ok(())
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Token ids of any byte sequence.
    pub fn encode(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(bytes.len() / 3);
        for chunk in bytes.utf8_chunks() {
            if !chunk.valid().is_empty() {
                let encoding = self
                    .inner
                    .encode(chunk.valid(), false)
                    .map_err(|e| MoeError::InvalidConfig(format!("tokenizer: {e}")))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            ids.extend(chunk.invalid().iter().map(|&b| self.byte_token[b as usize]));
        }
        Ok(ids)
    }

    /// The bytes of a token sequence (ids beyond the vocabulary decode to nothing).
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        out
    }

    /// The bytes of one token (empty for ids beyond the vocabulary).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }
}

/// Refuses a `tokenizer.json` whose pre-tokenizer adds a space before the
/// text (`"add_prefix_space": true`, found by the tokenizer fuzz target):
/// encoding would then not give back the bytes it was given. Read from the
/// JSON before `tokenizers` builds anything; [`Tokenizer::check_round_trip`]
/// catches whatever else changes the text.
fn check_pre_tokenizer(text: &str) -> std::result::Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        pre_tokenizer: Option<serde_json::Value>,
    }
    /// True when `value` (a pre-tokenizer, or a sequence of them) asks for a prefix space.
    fn adds_prefix_space(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::Object(map) => map.iter().any(|(key, v)| {
                (key == "add_prefix_space" && v == &serde_json::Value::Bool(true))
                    || adds_prefix_space(v)
            }),
            serde_json::Value::Array(items) => items.iter().any(adds_prefix_space),
            _ => false,
        }
    }
    let head: Head = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if head.pre_tokenizer.as_ref().is_some_and(adds_prefix_space) {
        return Err(
            "pre_tokenizer has \"add_prefix_space\": true (encoding would add a space the text does not have; a byte-level tokenizer needs false)"
                .into(),
        );
    }
    Ok(())
}

/// GPT-2's byte → printable-character map used by byte-level BPE: printable
/// Latin-1 bytes map to themselves, the other 68 to U+0100 onwards.
fn byte_to_unicode(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("below U+0144")
}

/// The inverse of [`byte_to_unicode`].
fn unicode_to_byte() -> impl Fn(char) -> Option<u8> {
    let table: Vec<(char, u8)> = (0..=255u8).map(|b| (byte_to_unicode(b), b)).collect();
    move |c| table.iter().find(|(u, _)| *u == c).map(|&(_, b)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_the_bpe_alphabet() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_to_unicode).collect();
        assert_eq!(chars.len(), 256);
        let alphabet: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(chars, alphabet);
    }
}
