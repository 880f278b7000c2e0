//! Tokenizer and training data.

use std::sync::OnceLock;

use proptest::prelude::*;
use rosetta_moe::data::{
    SHAKESPEARE, SOURCE_CORPUS, TextData, WindowSampler, builtin_corpus, evenly_spaced_batches,
};
use rosetta_moe::{Batch, MoeError, Tokenizer};

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::train(SOURCE_CORPUS.as_bytes(), 1000).unwrap())
}

#[test]
fn the_builtin_corpus_is_large_enough() {
    assert!(
        SOURCE_CORPUS.len() >= 50_000,
        "{} bytes",
        SOURCE_CORPUS.len()
    );
}

#[test]
fn tiny_shakespeare_is_compiled_in_whole_and_named_like_the_source_corpus() {
    assert_eq!(SHAKESPEARE.len(), 1_115_394);
    assert!(SHAKESPEARE.starts_with("First Citizen:\nBefore we proceed any further"));
    assert!(SHAKESPEARE.trim_end().ends_with("Whiles thou art waking."));
    assert_eq!(builtin_corpus("shakespeare"), Some(SHAKESPEARE));
    assert_eq!(builtin_corpus("source"), Some(SOURCE_CORPUS));
    assert_eq!(builtin_corpus("built-in"), None);
}

#[test]
fn training_fills_the_vocabulary_and_compresses() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 1000);
    let sample = &SOURCE_CORPUS.as_bytes()[..20_000];
    let ids = t.encode(sample).unwrap();
    assert!(
        ids.len() * 2 < sample.len(),
        "{} tokens for {} bytes",
        ids.len(),
        sample.len()
    );
    assert!(ids.iter().all(|&id| id < 1000));
}

#[test]
fn training_is_deterministic_and_survives_save_and_load() {
    let text = &SOURCE_CORPUS.as_bytes()[..30_000];
    let a = Tokenizer::train(text, 400).unwrap();
    let b = Tokenizer::train(text, 400).unwrap();
    let dir = tempfile::tempdir().unwrap();
    a.save(&dir.path().join("a.json")).unwrap();
    b.save(&dir.path().join("b.json")).unwrap();
    let (ja, jb) = (
        std::fs::read(dir.path().join("a.json")).unwrap(),
        std::fs::read(dir.path().join("b.json")).unwrap(),
    );
    assert_eq!(ja, jb);
    let loaded = Tokenizer::load(&dir.path().join("a.json")).unwrap();
    assert_eq!(loaded.encode(text).unwrap(), a.encode(text).unwrap());
}

#[test]
fn a_vocabulary_smaller_than_the_byte_alphabet_is_refused() {
    assert!(matches!(
        Tokenizer::train(b"abc", 100),
        Err(MoeError::InvalidConfig(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_bytes_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let t = tokenizer();
        let ids = t.encode(&bytes).unwrap();
        prop_assert_eq!(t.decode(&ids), bytes);
    }

    #[test]
    fn any_text_round_trips(text in "\\PC{0,200}") {
        let t = tokenizer();
        let ids = t.encode(text.as_bytes()).unwrap();
        prop_assert_eq!(t.decode(&ids), text.as_bytes());
    }
}

#[test]
fn data_splits_ninety_ten_and_refuses_too_little_text() {
    let t = tokenizer();
    let data = TextData::new(SOURCE_CORPUS.as_bytes(), t, 64).unwrap();
    let total = data.train.len() + data.val.len();
    assert_eq!(data.train.len(), (total as f64 * 0.9) as usize);
    assert!(data.val_bytes > data.val.len());
    assert!(matches!(
        TextData::new(b"", t, 8),
        Err(MoeError::EmptyInput(_))
    ));
    assert!(matches!(
        TextData::new(b"a short text", t, 64),
        Err(MoeError::DataTooSmall { needed: 65, .. })
    ));
}

#[test]
fn windows_are_contiguous_seeded_and_resumable() {
    let t = tokenizer();
    let data = TextData::new(SOURCE_CORPUS.as_bytes(), t, 16).unwrap();
    let mut batch = Batch::new(vec![0; 4 * 16], vec![0; 4 * 16], 4).unwrap();
    let mut sampler = WindowSampler::new(7);
    sampler.fill(&mut batch, &data.train);
    // targets are the ids shifted by one inside the same window
    for row in 0..4 {
        assert_eq!(
            batch.ids[row * 16 + 1..(row + 1) * 16],
            batch.targets[row * 16..(row + 1) * 16 - 1]
        );
    }
    let state = sampler.state();
    let mut straight = sampler.clone();
    let mut resumed = WindowSampler::resume(state);
    let (mut a, mut b) = (batch.clone(), batch.clone());
    straight.fill(&mut a, &data.train);
    resumed.fill(&mut b, &data.train);
    assert_eq!(a, b);
    let mut other = WindowSampler::new(8);
    other.fill(&mut b, &data.train);
    assert_ne!(a, b);
    let evals = evenly_spaced_batches(&data.val, 4, 16, 3).unwrap();
    assert_eq!(evals.len(), 3);
    assert_eq!(evals, evenly_spaced_batches(&data.val, 4, 16, 3).unwrap());
}
